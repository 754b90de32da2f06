"""The explanation-quality benchmark over any dataset of images with object masks.

A dataset gives samples (an image, a prompt, and a rule that finds the answer's object words and their masks).
For each sample the model answers with capture, and every method's maps of the object words are scored against
the masks (pointing game, Obj-IoU; optionally deletion / insertion), its function words by Func-IoU. Samples are
independent: under `accelerate launch` each process takes its share and the main process merges the records in
sample order, so a data-parallel run gives exactly the single-process table.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from ..capture import GenerationOptions, generate_with_capture
from ..methods import get_method
from .faithfulness import deletion_insertion
from .metrics import f1_iou, func_iou, obj_iou, otsu_threshold, pointing_hit, share_inside
from .words import Word, answer_words

# |p(original) - p(blurred)| below which deletion / insertion is not scored: the curves divide by it, so a word the
# blur moves by 0.1 has its map's curve multiplied by 10, and one such word outweighs dozens of others in the mean
MIN_BLUR_EFFECT = 0.5
COLUMNS = ("pointing_game", "pointing_instance", "pointing_unique", "obj_iou", "obj_iou_instance", "func_iou",
           "f1_iou", "deletion_auc", "insertion_auc", "cells_inside_object", "n_words", "n_faithfulness_words")


@dataclass
class WordTarget:
    """An object word of the answer and what it names. As in the pointing game and TAM's COCO protocol, a word is
    scored against its class: every object of its category (COCO), colour or shape (shapes); where the dataset
    also knows the one object the answer's phrase describes, that instance is scored on its own columns."""

    word: Word
    mask: np.ndarray  # bool [height, width] of the original image: every object of the word's class
    unique: bool  # the class has one object in the image (the word is unambiguous)
    instance_mask: np.ndarray | None = None  # the object the phrase describes, where known


@dataclass
class Sample:
    key: str
    image: Image.Image
    prompt: str
    targets: Callable[[list[Word]], list[WordTarget]]  # the answer's object words and their masks
    reference_answer: Callable[[str], bool] | None = None  # is the answer correct (None: not known)


def _word_map(explanation_maps: list[list[np.ndarray]]) -> np.ndarray:
    """One map for a word: the sum of its sub-tokens' maps (first image)."""
    return np.sum([maps[0] for maps in explanation_maps], axis=0)


def evaluate_sample(loaded, sample: Sample, methods: list[str], method_options: dict | None = None,
                    faithfulness: bool = False, max_new_tokens: int = 24,
                    min_blur_effect: float = MIN_BLUR_EFFECT) -> dict:
    """Score one sample: {"key", "correct", "records": [(map name, metric, value), ...], "curves": every object
    word's deletion / insertion AUC per map with its p(original) and p(blurred), scored or not}."""
    method_options = method_options or {}
    trace = generate_with_capture(loaded, [sample.image], sample.prompt,
                                  GenerationOptions(max_new_tokens=max_new_tokens))
    correct = None if sample.reference_answer is None else bool(sample.reference_answer(trace.answer))
    words = answer_words(loaded.processor.tokenizer, trace.answer_ids)
    targets = sample.targets(words)
    records, word_curves = [], []
    if not targets:
        return {"key": sample.key, "answer": trace.answer, "correct": correct, "records": records,
                "curves": word_curves}
    functions = [w for w in words if w.is_function_word]
    tokens = sorted({t for word in [*(target.word for target in targets), *functions] for t in word.tokens})
    layout = trace.images[0]
    for name in methods:
        explained = dict(zip(tokens, get_method(name).explain_many(trace, tokens, model=loaded,
                                                                    **method_options.get(name, {}))))
        if name == "cleann":
            for target in targets:
                cells = [tuple(c) for t in target.word.tokens for c in explained[t].details["image_cells"]]
                inside = share_inside(cells, layout, target.mask if target.instance_mask is None else
                                      target.instance_mask)
                if inside is not None:
                    records.append((name, "cells_inside_object", inside))
        for map_name in explained[tokens[0]].all_maps():
            thresholds = []
            for target in targets:
                sub_maps = [explained[t].all_maps()[map_name] for t in target.word.tokens]
                word_map = _word_map(sub_maps)
                hit = float(pointing_hit(word_map, layout, target.mask))
                records.append((map_name, "pointing_game", hit))
                if target.unique:
                    records.append((map_name, "pointing_unique", hit))
                # TAM protocol: the best sub-token
                records.append((map_name, "obj_iou", max(obj_iou(m[0], layout, target.mask) for m in sub_maps)))
                if target.instance_mask is not None:
                    records.append((map_name, "pointing_instance",
                                    float(pointing_hit(word_map, layout, target.instance_mask))))
                    records.append((map_name, "obj_iou_instance",
                                    max(obj_iou(m[0], layout, target.instance_mask) for m in sub_maps)))
                if (threshold := otsu_threshold(word_map, layout)) is not None:
                    thresholds.append(threshold)
                if faithfulness:
                    curves = deletion_insertion(loaded, trace, target.word.tokens[0], word_map)
                    word_curves.append({"word": target.word.text, "token": target.word.tokens[0], "map": map_name,
                                        **{key: curves[key] for key in ("p_original", "p_blurred", "deletion_auc",
                                                                        "insertion_auc")}})
                    # a word the blur hardly changes has no visual evidence to order: its normalised scores
                    # divide by ~0, so it is left out
                    if abs(curves["p_original"] - curves["p_blurred"]) >= min_blur_effect:
                        records.append((map_name, "deletion_auc", curves["deletion_auc"]))
                        records.append((map_name, "insertion_auc", curves["insertion_auc"]))
            for word in functions if thresholds else []:
                word_map = _word_map([explained[t].all_maps()[map_name] for t in word.tokens])
                records.append((map_name, "func_iou", func_iou(word_map, layout, float(np.mean(thresholds)))))
    return {"key": sample.key, "answer": trace.answer, "correct": correct, "records": records,
            "curves": word_curves}


def aggregate(results: list[dict]) -> dict:
    """The table (map -> metric -> mean) from per-sample results, in the order given."""
    values = defaultdict(lambda: defaultdict(list))
    for result in results:
        for map_name, metric, value in result["records"]:
            values[map_name][metric].append(value)
    table = {}
    for map_name, metrics in values.items():
        row = {metric: float(np.mean(v)) for metric, v in metrics.items() if v}
        if "obj_iou" in row and "func_iou" in row:
            row["f1_iou"] = f1_iou(row["obj_iou"], row["func_iou"])
        row["n_words"] = len(metrics.get("pointing_game", []))
        if "deletion_auc" in metrics:
            row["n_faithfulness_words"] = len(metrics["deletion_auc"])
        table[map_name] = row
    known = [r["correct"] for r in results if r["correct"] is not None]
    return {"n_samples": len(results), "answer_accuracy": float(np.mean(known)) if known else None,
            "methods": table}


def process_state():
    """This process's place in an `accelerate launch` (a single process otherwise); CPU-only machines run the
    processes over gloo."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def run_benchmark(loaded, sample_at: Callable[[int], Sample], n: int, methods: list[str],
                  method_options: dict | None = None, faithfulness: bool = False, max_new_tokens: int = 24,
                  progress: bool = True, min_blur_effect: float = MIN_BLUR_EFFECT) -> dict:
    """Evaluate samples 0..n-1, split between the processes of an `accelerate launch` (one process otherwise);
    every process returns the same merged result."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = process_state()
    with state.split_between_processes(list(range(n))) as mine:
        bar = tqdm(mine, desc="samples", unit="sample", disable=not (progress and state.is_main_process))
        results = [{"index": i, **evaluate_sample(loaded, sample_at(i), methods, method_options, faithfulness,
                                                  max_new_tokens, min_blur_effect)} for i in bar]
    if state.num_processes > 1:
        results = sorted(gather_object(results), key=lambda r: r["index"])
    summary = aggregate(results)
    summary["answers"] = [{"key": r["key"], "answer": r["answer"], "correct": r["correct"]} for r in results]
    if faithfulness:
        summary["min_blur_effect"] = min_blur_effect
        summary["word_curves"] = [{"key": r["key"], **curve} for r in results for curve in r["curves"]]
    summary["processes"] = state.num_processes
    return summary
