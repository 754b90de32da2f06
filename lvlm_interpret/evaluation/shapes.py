"""Ground-truth benchmark on held-out synthetic scenes: do the maps of a description's colour and shape words
land on the object they name, do its function words light nothing, and does the model's confidence follow the
maps (deletion / insertion)?"""

from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np

from ..capture import GenerationOptions, generate_with_capture
from ..demo.scenes import (
    COLOURS, DESCRIBE_PROMPT, HELD_OUT_SEED_START, SHAPES, describe, draw_scene, normalise_answer,
)
from ..methods import get_method
from ..methods.visual_relevance import STOP_WORDS
from .faithfulness import deletion_insertion
from .metrics import f1_iou, func_iou, obj_iou, otsu_threshold, pointing_hit, share_inside


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


def function_words(answer_texts: list[str]) -> list[int]:
    """Answer tokens that are function words (determiners, conjunctions, ...), by their text."""
    return [i for i, text in enumerate(answer_texts) if text.strip().lower() in STOP_WORDS]


def evaluate_shapes(loaded, n: int, methods: list[str], method_options: dict | None = None, size=192,
                    seed_start: int = HELD_OUT_SEED_START, faithfulness: bool = False, progress: bool = True) -> dict:
    method_options = method_options or {}
    metrics = defaultdict(lambda: defaultdict(list))  # map name -> metric -> values
    correct = 0
    for k in range(n):
        scene = draw_scene(seed_start + k, size)
        trace = generate_with_capture(loaded, [scene.image], DESCRIBE_PROMPT, GenerationOptions(max_new_tokens=24))
        correct += normalise_answer(trace.answer) == normalise_answer(describe(scene))
        words = object_words(trace.answer_texts, scene)
        functions = function_words(trace.answer_texts) if words else []
        layout = trace.images[0]
        for name in methods:
            if not words:
                break
            explained = get_method(name).explain_many(trace, [t for t, _, _ in words] + functions, model=loaded,
                                                      **method_options.get(name, {}))
            object_explanations, function_explanations = explained[:len(words)], explained[len(words):]
            for (token, obj, kind), explanation in zip(words, object_explanations):
                mask = scene.masks[obj]
                # a word whose colour / shape another object shares names a class, not one instance
                attribute = (lambda o: o.colour) if kind == "colour" else (lambda o: o.shape)
                unique = sum(attribute(o) == attribute(scene.objects[obj]) for o in scene.objects) == 1
                if name == "cleann":
                    inside = share_inside([tuple(c) for c in explanation.details["image_cells"]], layout, mask)
                    if inside is not None:
                        metrics[name]["cells_inside_object"].append(inside)
                for map_name, maps in explanation.all_maps().items():
                    hit = pointing_hit(maps[0], layout, mask)
                    metrics[map_name]["pointing_game"].append(hit)
                    if unique:
                        metrics[map_name]["pointing_unique"].append(hit)
                    metrics[map_name]["obj_iou"].append(obj_iou(maps[0], layout, mask))
                    if faithfulness:
                        curves = deletion_insertion(loaded, trace, token, maps[0])
                        metrics[map_name]["deletion_auc"].append(curves["deletion_auc"])
                        metrics[map_name]["insertion_auc"].append(curves["insertion_auc"])
            for map_name in object_explanations[0].all_maps():
                thresholds = [otsu_threshold(e.all_maps()[map_name][0], layout) for e in object_explanations]
                thresholds = [t for t in thresholds if t is not None]
                if thresholds:
                    for explanation in function_explanations:
                        metrics[map_name]["func_iou"].append(
                            func_iou(explanation.all_maps()[map_name][0], layout, float(np.mean(thresholds))))
        if progress:
            print(f"\rscenes {k + 1}/{n}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    table = {}
    for map_name, values in metrics.items():
        row = {metric: float(np.mean(v)) for metric, v in values.items() if v}
        if "obj_iou" in row and "func_iou" in row:
            row["f1_iou"] = f1_iou(row["obj_iou"], row["func_iou"])
        row["n_words"] = len(values.get("pointing_game", []))
        table[map_name] = row
    return {"dataset": "shapes", "n_scenes": n, "size": size, "seed_start": seed_start,
            "describe_accuracy": correct / n if n else 0.0, "methods": table}
