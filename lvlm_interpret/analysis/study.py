"""The paper's mean-ablation finding on the demo model, with ground-truth masks: ablating the tokens of the
asked-about object should hurt the answer far more than ablating as many random image tokens.

Held-out scenes (seeds from HELD_OUT_SEED_START, never trained on); per scene the leftmost object whose shape is
unique is asked "What color is the <shape>?", and the leftmost object with a unique colour and shape
"Is there a <colour> <shape>?" (yes)."""

from __future__ import annotations

import numpy as np
import torch

from ..capture import GenerationOptions, generate_with_capture
from ..demo.scenes import (
    DESCRIBE_PROMPT, HELD_OUT_SEED_START, color_prompt, draw_scene, exists_prompt, normalise_answer,
)
from .ablation import ablate, mean_visual_embedding
from .knockout import knockout
from .logit_lens import logit_lens
from .token_sets import object_tokens, positions_to_cells, random_tokens

CONDITIONS = ("object (mean)", "random (mean)", "object (zero)")
MEAN_SCENES = 50  # training-distribution scenes (seeds 0..49) for the default mean embedding


def default_mean_embedding(loaded, size: int = 192) -> torch.Tensor:
    return mean_visual_embedding(loaded, [draw_scene(seed, size).image for seed in range(MEAN_SCENES)])[0]


def study_questions(scene) -> list[tuple[str, str, int]]:
    """(prompt, expected answer, object index): the colour of the leftmost object whose shape is unique, and
    "is there" for the leftmost object whose colour and shape together are unique."""
    questions = []
    order = scene.left_to_right()
    unique_shape = [i for i in order if sum(o.shape == scene.objects[i].shape for o in scene.objects) == 1]
    if unique_shape:
        questions.append((color_prompt(scene.objects[unique_shape[0]].shape), scene.objects[unique_shape[0]].colour,
                          unique_shape[0]))
    unique_name = [i for i in order if sum(o.name == scene.objects[i].name for o in scene.objects) == 1]
    if unique_name:
        target = scene.objects[unique_name[0]]
        questions.append((exists_prompt(target.colour, target.shape), "yes", unique_name[0]))
    return questions


def study_cases(loaded, n: int, buffer: int = 1, size: int = 192, seed: int = 0, progress=None):
    """Per question of `n` held-out scenes: (scene, prompt, expected answer, trace, the object's tokens grown by
    `buffer`, as many random image tokens away from the object)."""
    options = GenerationOptions(max_new_tokens=4)
    for i in range(n):
        scene = draw_scene(HELD_OUT_SEED_START + i, size)
        for prompt, expected, index in study_questions(scene):
            trace = generate_with_capture(loaded, [scene.image], prompt, options)
            objects = object_tokens(trace, scene.masks[index], buffer)
            yield scene, prompt, expected, trace, objects, random_tokens(trace, len(objects), seed + i, exclude=objects)
        if progress:
            progress(i + 1, n)


def ablation_study(loaded, n: int, mean: torch.Tensor, buffer: int = 1, size: int = 192, seed: int = 0,
                   progress=None) -> dict:
    """Accuracy and mean target-token probability per condition; `rows` has one entry per question."""
    rows = []
    for scene, prompt, expected, trace, objects, others in study_cases(loaded, n, buffer, size, seed, progress):
        sets = {"object (mean)": (objects, "mean"), "random (mean)": (others, "mean"),
                "object (zero)": (objects, "zero")}
        row = {"seed": scene.seed, "prompt": prompt, "expected": expected, "answer": trace.answer,
               "correct": normalise_answer(trace.answer) == expected, "n_tokens": len(objects)}
        for condition, (positions, replacement) in sets.items():
            # the answers are one word: when the unablated answer is right, the ablated one is right exactly
            # when its first token stays the argmax (no regeneration needed)
            result = ablate(loaded, trace, positions, replacement, mean, regenerate=False)
            row[condition] = {"prob": result.prob_after, "correct": row["correct"] and result.still_argmax}
        row["prob"] = result.prob_before
        rows.append(row)
    return {"n_scenes": n, "n_questions": len(rows), "buffer": buffer, "summary": summarise(rows), "rows": rows}


def summarise(rows: list[dict]) -> dict:
    """Per condition over the questions answered correctly without ablation: accuracy after ablation, its
    relative drop, and the mean probability of the originally generated first answer token."""
    kept = [row for row in rows if row["correct"]]
    if not kept:
        return {}
    summary = {"none": {"accuracy": 1.0, "accuracy_drop": 0.0,
                        "mean_prob": sum(row["prob"] for row in kept) / len(kept), "n": len(kept)}}
    for condition in CONDITIONS:
        accuracy = sum(row[condition]["correct"] for row in kept) / len(kept)
        summary[condition] = {"accuracy": accuracy, "accuracy_drop": 1.0 - accuracy,
                              "mean_prob": sum(row[condition]["prob"] for row in kept) / len(kept), "n": len(kept)}
    return summary


def table(result: dict) -> str:
    lines = ["| ablated tokens | accuracy | accuracy drop | mean p(answer token) |", "|---|---|---|---|"]
    for condition, row in result["summary"].items():
        lines.append(f"| {condition} | {row['accuracy']:.3f} | {100 * row['accuracy_drop']:.1f}% | "
                     f"{row['mean_prob']:.3f} |")
    return "\n".join(lines)


def lens_word_share(loaded, n: int, k: int = 5, size: int = 192, seed_offset: int = 500, progress=None) -> dict:
    """Logit lens on held-out scenes ("Describe the image."): per layer, the share of object patches (mask, no
    buffer) whose top-k tokens contain the object's colour word, and its shape word."""
    colour_hits = shape_hits = None
    n_patches = 0
    for i in range(n):
        scene = draw_scene(HELD_OUT_SEED_START + seed_offset + i, size)
        trace = generate_with_capture(loaded, [scene.image], DESCRIBE_PROMPT, GenerationOptions(max_new_tokens=2))
        lens = logit_lens(loaded, trace, k)
        if colour_hits is None:
            colour_hits, shape_hits = np.zeros(len(lens.layers)), np.zeros(len(lens.layers))
        for obj, mask in zip(scene.objects, scene.masks):
            cells = np.flatnonzero(positions_to_cells(trace, object_tokens(trace, mask)).ravel())
            for slot in range(len(lens.layers)):
                words = [[text.strip() for text in lens.texts[slot][cell]] for cell in cells]
                colour_hits[slot] += sum(obj.colour in top for top in words)
                shape_hits[slot] += sum(obj.shape in top for top in words)
            n_patches += len(cells)
        if progress:
            progress(i + 1, n)
    return {"n_scenes": n, "k": k, "n_object_patches": n_patches, "layers": lens.layers,
            "colour_share": (colour_hits / n_patches).round(4).tolist(),
            "shape_share": (shape_hits / n_patches).round(4).tolist()}


def knockout_study(loaded, n: int, buffer: int = 1, size: int = 192, seed: int = 0, progress=None) -> dict:
    """Attention knockout from the answer's predicting position to the asked-about object's tokens, and to as
    many random image tokens, per layer window, over the study's questions answered right."""
    rows = []
    for scene, prompt, expected, trace, objects, others in study_cases(loaded, n, buffer, size, seed, progress):
        if normalise_answer(trace.answer) != expected:
            continue
        row = {"seed": scene.seed, "prompt": prompt, "n_tokens": len(objects)}
        for name, keys in (("object", objects), ("random", others)):
            result = knockout(loaded, trace, keys)
            row[name] = {"drop": result.drops(), "flipped": [not w.still_argmax for w in result.windows]}
        row["windows"] = [[w.window, w.layers] for w in result.windows]
        rows.append(row)
    summary = {}
    if rows:
        for slot, (window, layers) in enumerate(rows[0]["windows"]):
            summary[window] = {"layers": layers, **{
                f"{name}_{key}": float(np.mean([row[name][key][slot] for row in rows]))
                for name in ("object", "random") for key in ("drop", "flipped")}}
    return {"n_scenes": n, "n_questions": len(rows), "buffer": buffer, "summary": summary, "rows": rows}


def knockout_table(result: dict) -> str:
    lines = ["| window (layers) | object tokens: mean p drop | answers flipped | random tokens: mean p drop | "
             "answers flipped |", "|---|---|---|---|---|"]
    for window, row in result["summary"].items():
        lines.append(f"| {window} ({row['layers'][0]}-{row['layers'][-1]}) | {100 * row['object_drop']:.1f}% | "
                     f"{row['object_flipped']:.3f} | {100 * row['random_drop']:.1f}% | {row['random_flipped']:.3f} |")
    return "\n".join(lines)
