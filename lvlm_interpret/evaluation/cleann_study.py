"""CLEANN on held-out demo scenes: how often its set is verified, where its image cells lie, how large it is and
how long one token takes.

    python -m lvlm_interpret.evaluation.cleann_study --n-words 200 [--option NAME=VALUE ...] --out FILE.json

"Describe the image." on held-out scenes (seeds from HELD_OUT_SEED_START); the colour and shape words of the
descriptions that are right as a whole (the shapes benchmark's rule) are explained one token at a time. Each
word's record is appended to FILE.jsonl as soon as it is done, so that a stopped run resumes where it was (with
the same options); FILE.json gets the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_dilation

from ..errors import UserInputError
from .metrics import cell_mask_overlap


def parse_option(text: str) -> tuple[str, object]:
    """NAME=VALUE, the value read as JSON where it is (numbers, true / false, null), else as text."""
    name, separator, value = text.partition("=")
    if not separator or not name:
        raise UserInputError(f"--option takes NAME=VALUE (e.g. layer=2), got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def word_record(explanation, layout, instance_mask: np.ndarray, class_mask: np.ndarray) -> dict:
    """One word's figures: the set's size and image cells against the described object's cells (a cell is the
    object's when any of its pixels is), the object with a one-cell border, and every object the word names (its
    class: all objects of that colour or shape, as the pointing benchmark scores a word)."""
    details = explanation.details
    on_object = cell_mask_overlap(layout, instance_mask) > 0
    on_class = cell_mask_overlap(layout, class_mask) > 0
    cells = [tuple(cell) for cell in details["image_cells"]]
    return {
        "verified": bool(details["verified"]),
        "set_size": len(cells) + len(details["text_tokens"]) + sum(len(v) for v in details["view_cells"].values()),
        "image_cells": len(cells),
        "cells_inside": int(sum(on_object[row, col] for row, col in cells)),
        "cells_inside_class": int(sum(on_class[row, col] for row, col in cells)),
        "object_cells": int(on_object.sum()),
        "object_and_border_cells": int(binary_dilation(on_object, structure=np.ones((3, 3), bool)).sum()),
        "prob_before": float(details["prob_before"]),
        "prob_after": float(details["prob_after"]),
    }


def summarise(records: list[dict]) -> dict:
    n = len(records)
    if not n:
        return {"n_words": 0}
    non_empty = [r for r in records if r["set_size"]]
    with_cells = [r for r in records if r["image_cells"]]
    verified_cells = [r for r in with_cells if r["verified"]]
    sizes = np.array([r["set_size"] for r in records])
    bounds = np.array([r["object_and_border_cells"] for r in records])
    return {
        "n_words": n,
        "n_scenes": len({r["scene"] for r in records}),
        "verified_share": float(np.mean([r["verified"] for r in records])),
        "empty_set_share": 1 - len(non_empty) / n,
        "cells_inside_share": (float(sum(r["cells_inside"] for r in with_cells) / sum(r["image_cells"]
                                                                                    for r in with_cells))
                               if with_cells else None),  # pooled over every set's image cells
        "cells_inside_share_per_set": float(np.mean([r["cells_inside"] / r["image_cells"] for r in with_cells]))
        if with_cells else None,
        # pooled, against every object the word names (records written before this figure existed lack it)
        "cells_inside_class_share": (float(sum(r["cells_inside_class"] for r in with_cells) /
                                           sum(r["image_cells"] for r in with_cells))
                                     if with_cells and all("cells_inside_class" in r for r in with_cells) else None),
        "median_set_size": float(np.median(sizes)),
        "median_object_cells": float(np.median([r["object_cells"] for r in records])),
        "median_object_and_border_cells": float(np.median(bounds)),
        "share_sets_within_object_and_border": float(np.mean(sizes <= bounds)),
        "text_only_set_share": float(np.mean([r["set_size"] > 0 and not r["image_cells"] for r in records])),
        "seconds_per_token_median": float(np.median([r["seconds"] for r in records])),
        "seconds_per_token_mean": float(np.mean([r["seconds"] for r in records])),
        # the process's CPU time: with --threads 1, the token's compute, which waiting for a busy core does not add to
        "cpu_seconds_per_token_median": float(np.median([r["cpu_seconds"] for r in records]))
        if all("cpu_seconds" in r for r in records) else None,
        "forwards_per_token_mean": float(np.mean([r["forwards"] for r in records])),
        "load_average_mean": float(np.mean([r["load_average"] for r in records])),  # of the 2 shared cores
        "verified_cells_inside_share": (float(sum(r["cells_inside"] for r in verified_cells) /
                                              sum(r["image_cells"] for r in verified_cells))
                                        if verified_cells else None),
    }


def run_study(n_words: int, options: dict, jsonl: Path, max_scenes: int = 1000, progress=print) -> list[dict]:
    """Explain words until `n_words` are recorded in `jsonl` (kept from an earlier run with the same options)."""
    from ..capture import GenerationOptions, generate_with_capture
    from ..methods import get_method
    from ..models.loading import load_model
    from .shapes import shapes_sample
    from .words import answer_words

    records = []
    if jsonl.exists():
        lines = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        if lines and lines[0].get("options") != options:
            raise UserInputError(f"{jsonl} was written with other options ({lines[0].get('options')}): pass the "
                                 "same options, or another --out")
        records = lines[1:]
    else:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        jsonl.write_text(json.dumps({"options": options}) + "\n")
    done = {(r["scene"], r["token_index"]) for r in records}
    method = get_method("cleann")
    method.check_options(options)
    loaded = load_model("demo", device="cpu")
    # LM forwards per token (whole-model or decoder-only): the cost that does not depend on how busy the machine is
    forwards = [0]
    loaded.family.language_model(loaded.model).register_forward_pre_hook(
        lambda module, args: forwards.__setitem__(0, forwards[0] + 1))
    with jsonl.open("a") as out:
        for scene in range(max_scenes):
            if len(records) >= n_words:
                break
            sample = shapes_sample(scene)
            trace = generate_with_capture(loaded, [sample.image], sample.prompt, GenerationOptions(max_new_tokens=24))
            if not sample.reference_answer(trace.answer):
                continue
            for target in sample.targets(answer_words(loaded.processor.tokenizer, trace.answer_ids)):
                token_index = target.word.tokens[0]
                if (scene, token_index) in done or len(records) >= n_words:
                    continue
                start, cpu_start, forwards[0] = time.perf_counter(), time.process_time(), 0
                explanation = method.explain(trace, token_index, model=loaded, **options)
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
                record = {"scene": scene, "token_index": token_index, "word": target.word.text, "seconds": seconds,
                          "cpu_seconds": cpu_seconds,
                          "forwards": forwards[0], "load_average": os.getloadavg()[0],
                          **word_record(explanation, trace.images[0], target.instance_mask, target.mask)}
                out.write(json.dumps(record) + "\n")
                out.flush()
                records.append(record)
            progress(f"scene {scene}: {len(records)} words")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lvlm_interpret.evaluation.cleann_study",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-words", type=int, default=200)
    parser.add_argument("--option", action="append", default=[], help="a CLEANN option NAME=VALUE (repeatable)")
    parser.add_argument("--out", required=True, help="the summary's JSON file; the per-word records go to .jsonl")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    try:
        options = dict(parse_option(text) for text in args.option)
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        out = Path(args.out)
        records = run_study(args.n_words, options, out.with_suffix(".jsonl"),
                            progress=lambda line: print(line, file=sys.stderr))
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = {"command": " ".join(["python -m lvlm_interpret.evaluation.cleann_study", *(argv or sys.argv[1:])]),
               "options": options, "date": time.strftime("%Y-%m-%d"), **summarise(records)}
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for name, value in summary.items():
        print(f"{name}: {round(value, 3) if isinstance(value, float) else value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
