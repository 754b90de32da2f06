"""Does editing one SAE feature change the demo model's answer the way the feature's meaning says? For held-out
scenes' colour questions ("What color is the circle?", asked of an object whose shape is unique in its scene and
answered correctly), the object's colour feature F_c (the one `sae auroc` chose) is zeroed on the object's cells
or on the whole image, or scaled negative on the object's cells, and each other colour's feature F_t is clamped
to a multiple of its typical activation on the object's cells, with F_c zeroed or kept. Counted: answers that
change, and answers that become the target colour t."""

from __future__ import annotations

import numpy as np

from ..capture import GenerationOptions, generate_with_capture
from ..demo.scenes import COLOURS, HELD_OUT_SEED_START, color_prompt, draw_scene
from ..errors import UserInputError
from ..evaluation.metrics import cell_mask_overlap
from .features import FeatureEdit, LoadedSAE, generate_edited, request_layouts
from .probe import object_cells

STUDY_SEED_OFFSET = 1000  # after the AUROC's selection and evaluation scenes (offsets 0 .. n_select + n_eval)
FACTORS = (4.0, 8.0, 16.0)  # clamped activation = factor x the feature's typical activation on its own colour
NEGATIVE_SCALE = -4.0


def typical_activations(loaded, bundle: LoadedSAE, features: dict[str, int], n_scenes: int) -> dict[str, float]:
    """Per colour: the mean activation of its feature over the object cells of that colour (the AUROC's first
    `n_scenes` selection scenes)."""
    activations, labels = object_cells(loaded, bundle, range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + n_scenes))
    colours = np.array([colour for colour, _ in labels])
    if any(not (colours == colour).any() for colour in COLOURS):
        raise UserInputError(f"{n_scenes} scenes do not hold every colour: use more scenes")
    return {colour: float(activations[colours == colour, features[colour]].mean()) for colour in COLOURS}


def study_questions(n_scenes: int):
    """(scene, object index) of every object of held-out scenes whose shape is unique in its scene."""
    for seed in range(HELD_OUT_SEED_START + STUDY_SEED_OFFSET, HELD_OUT_SEED_START + STUDY_SEED_OFFSET + n_scenes):
        scene = draw_scene(seed)
        shapes = [obj.shape for obj in scene.objects]
        for index, obj in enumerate(scene.objects):
            if shapes.count(obj.shape) == 1:
                yield scene, index


def _conditions(features: dict[str, int], typical: dict[str, float], colour: str):
    """(name, target colour or None, scales, values, on the object's cells only) of the edits tried on an object
    of `colour`."""
    own = features[colour]
    yield "zero F_c on the object", None, {own: 0.0}, {}, True
    yield "zero F_c on the image", None, {own: 0.0}, {}, False
    yield f"scale F_c by {NEGATIVE_SCALE:g} on the object", None, {own: NEGATIVE_SCALE}, {}, True
    for target in COLOURS:
        if target == colour:
            continue
        for factor in FACTORS:
            value = {features[target]: factor * typical[target]}
            yield f"clamp F_t to {factor:g} x typical", target, {}, value, True
            yield f"zero F_c, clamp F_t to {factor:g} x typical", target, {own: 0.0}, value, True


def steering_study(loaded, bundle: LoadedSAE, features: dict[str, int], n_scenes: int = 50,
                   n_typical: int = 50, progress=None) -> dict:
    """Per edit: `n` (questions, times targets where there is one), `changed` (the answer differs from the clean
    one), `to_target` (the answer is the target colour) and `by_target` ({colour: [became it, tried]})."""
    missing = [colour for colour in COLOURS if colour not in features]
    if missing:
        raise UserInputError(f"no feature named for {', '.join(missing)}: give the auroc.json of `sae auroc`")
    typical = typical_activations(loaded, bundle, features, n_typical)
    options = GenerationOptions(max_new_tokens=4)
    counts: dict[str, dict] = {}
    n_questions = skipped = 0
    for scene, index in study_questions(n_scenes):
        obj = scene.objects[index]
        prompt = color_prompt(obj.shape)
        clean = generate_with_capture(loaded, [scene.image], prompt, options).answer
        if clean != obj.colour:
            skipped += 1
            continue
        n_questions += 1
        layout = request_layouts(loaded, [scene.image], prompt)[0]
        cells = [tuple(int(v) for v in cell) for cell in np.argwhere(cell_mask_overlap(layout, scene.masks[index]) > 0)]
        for name, target, scales, values, on_object in _conditions(features, typical, obj.colour):
            edit = FeatureEdit.make(bundle.path, scales, values, cells if on_object else None)
            answer = generate_edited(loaded, bundle, [scene.image], prompt, edit, options).answer
            row = counts.setdefault(name, {"n": 0, "changed": 0, "to_target": 0 if target else None,
                                           "by_target": {colour: [0, 0] for colour in COLOURS} if target else None})
            row["n"] += 1
            row["changed"] += answer != clean
            if target:
                row["to_target"] += answer == target
                row["by_target"][target][0] += answer == target
                row["by_target"][target][1] += 1
        if progress:
            progress(n_questions + skipped)
    return {"hook_name": bundle.hook_name, "features": {colour: features[colour] for colour in COLOURS},
            "typical_activation": typical, "n_typical_scenes": n_typical, "n_scenes": n_scenes,
            "seed_start": HELD_OUT_SEED_START + STUDY_SEED_OFFSET, "n_questions": n_questions,
            "skipped_wrong_clean_answer": skipped, "edits": counts}
