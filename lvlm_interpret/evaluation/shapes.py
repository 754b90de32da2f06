"""Ground-truth benchmark on held-out synthetic scenes: do the maps of a description's colour and shape words
land on the object they name?"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np

from ..capture import GenerationOptions, generate_with_capture
from ..demo.scenes import (
    COLOURS, DESCRIBE_PROMPT, HELD_OUT_SEED_START, SHAPES, describe, draw_scene, normalise_answer,
)
from ..methods import get_method
from .metrics import obj_iou, pointing_hit, share_inside



def object_words(answer_texts: list[str], scene) -> list[tuple[int, int, str]]:
    """(token index, object index, "colour" | "shape") for each "<colour> <shape>" pair of a description that
    names the object at the same left-to-right place."""
    words = [text.strip().lower() for text in answer_texts]
    order = scene.left_to_right()
    found, pair = [], 0
    for i in range(len(words) - 1):
        if words[i] in COLOURS and words[i + 1] in SHAPES:
            if pair < len(order):
                target = scene.objects[order[pair]]
                if (target.colour, target.shape) == (words[i], words[i + 1]):
                    found += [(i, order[pair], "colour"), (i + 1, order[pair], "shape")]
            pair += 1
    return found


def evaluate_shapes(loaded, n: int, methods: list[str], method_options: dict | None = None, size=192,
                    seed_start: int = HELD_OUT_SEED_START, progress: bool = True) -> dict:
    method_options = method_options or {}
    pointing, iou, share = defaultdict(list), defaultdict(list), []
    correct = 0
    for k in range(n):
        scene = draw_scene(seed_start + k, size)
        trace = generate_with_capture(loaded, [scene.image], DESCRIBE_PROMPT, GenerationOptions(max_new_tokens=24))
        correct += normalise_answer(trace.answer) == normalise_answer(describe(scene))
        words = object_words(trace.answer_texts, scene)
        tokens = [t for t, _, _ in words]
        for name in methods:
            if not tokens:
                break
            explanations = get_method(name).explain_many(trace, tokens, model=loaded, **method_options.get(name, {}))
            for (_, obj, _), explanation in zip(words, explanations):
                mask, layout = scene.masks[obj], trace.images[0]
                if name == "cleann":
                    inside = share_inside([tuple(c) for c in explanation.details["image_cells"]], layout, mask)
                    if inside is not None:
                        share.append(inside)
                for map_name, maps in explanation.all_maps().items():
                    pointing[map_name].append(pointing_hit(maps[0], layout, mask))
                    iou[map_name].append(obj_iou(maps[0], layout, mask))
        if progress:
            print(f"\rscenes {k + 1}/{n}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    table = {name: {"pointing_game": float(np.mean(pointing[name])), "obj_iou": float(np.mean(iou[name])),
                    "n_words": len(pointing[name])} for name in pointing}
    if share:
        table["cleann"]["cells_inside_object"] = float(np.mean(share))
    return {"dataset": "shapes", "n_scenes": n, "size": size, "seed_start": seed_start,
            "describe_accuracy": correct / n if n else 0.0, "methods": table}
