"""CLI subcommands of the analyses: mean-embedding, ablate, knockout, logit-lens, ablation-study.

Same conventions as `explain`: JSON into --out, one `error: ...` line and exit 2 on bad input, and output staged
in a temporary folder and moved into place only when everything succeeded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..capture import GenerationOptions, generate_with_capture
from ..errors import UserInputError
from ..export import staged_folder
from ..images import load_image
from ..models.loading import DEFAULT_MODEL, load_model
from .ablation import REPLACEMENTS, ablate, load_mean_embedding, mean_embedding_from_folder, save_mean_embedding
from .knockout import WINDOWS, knockout, knockout_figure
from .logit_lens import logit_lens
from .study import (
    ablation_study, default_mean_embedding, knockout_study, knockout_table, lens_word_share, table,
)
from .token_sets import KINDS, positions_to_cells, select_tokens

COMMANDS = ("mean-embedding", "ablate", "knockout", "logit-lens", "ablation-study", "knockout-study",
            "logit-lens-study")


def add_parsers(commands) -> None:
    mean = commands.add_parser("mean-embedding", help="mean LM-input embedding of the image tokens of a folder "
                                                      "of images (for mean ablation)")
    mean.add_argument("--images", required=True, help="folder of images")
    mean.add_argument("--model", default=DEFAULT_MODEL)
    mean.add_argument("--device", default="auto")
    mean.add_argument("--out", required=True, help="safetensors file to write")

    for name, help_text in (("ablate", "replace a set of image tokens at the LM input and compare the answer"),
                            ("knockout", "block attention to a set of tokens over layer windows"),
                            ("logit-lens", "top-k vocabulary tokens of every image patch at every layer")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--image", required=True, help="image file")
        command.add_argument("--prompt", required=True)
        command.add_argument("--model", default=DEFAULT_MODEL)
        command.add_argument("--device", default="auto")
        command.add_argument("--max-new-tokens", type=int, default=8)
        command.add_argument("--out", required=True, help="output folder")
        if name == "logit-lens":
            command.add_argument("--top-k", type=int, default=5)
            command.add_argument("--layers", default="all", help="all, 3, 2-5 or 1,4")
            continue
        command.add_argument("--token", type=int, default=0, help="answer token to score (default the first)")
        command.add_argument("--set", required=True, choices=KINDS, help="which image tokens")
        command.add_argument("--mask", help="object mask image the size of the input image (non-black = object)")
        command.add_argument("--box", help="object region x0,y0,x1,y1 in image pixels")
        command.add_argument("--buffer", type=int, default=0, help="grow object tokens by this many patches")
        command.add_argument("--k", type=int, help="number of tokens for random / top")
        command.add_argument("--seed", type=int, default=0, help="seed of the random set")
        command.add_argument("--method", help="explanation method ranking the top set (e.g. tam, relevancy)")
        if name == "ablate":
            command.add_argument("--replacement", default="mean", choices=REPLACEMENTS)
            command.add_argument("--mean", help="mean embedding file from the mean-embedding command")
        else:
            command.add_argument("--windows", default=",".join(WINDOWS),
                                 help=f"comma list of {', '.join(WINDOWS)} or custom ranges like 2-5")
            command.add_argument("--queries", default=None,
                                 help="query positions to block from (default: the one predicting --token)")

    study = commands.add_parser("ablation-study", help="object vs random token ablation on held-out demo scenes")
    study.add_argument("--n", type=int, default=100, help="number of held-out scenes")
    study.add_argument("--model", default=DEFAULT_MODEL)
    study.add_argument("--device", default="auto")
    study.add_argument("--buffer", type=int, default=1, help="patch buffer around the object's mask")
    study.add_argument("--mean", help="mean embedding file (default: computed from 50 training scenes)")
    study.add_argument("--out", required=True, help="output folder for study.json")

    knockout_study = commands.add_parser("knockout-study", help="attention knockout of the asked-about object vs "
                                                                "random tokens per layer window, held-out scenes")
    knockout_study.add_argument("--n", type=int, default=50, help="number of held-out scenes")
    knockout_study.add_argument("--model", default=DEFAULT_MODEL)
    knockout_study.add_argument("--device", default="auto")
    knockout_study.add_argument("--buffer", type=int, default=1, help="patch buffer around the object's mask")
    knockout_study.add_argument("--out", required=True, help="output folder for knockout_study.json")

    lens_study = commands.add_parser("logit-lens-study", help="logit lens on held-out demo scenes: how often object "
                                                              "patches read as their colour / shape word per layer")
    lens_study.add_argument("--n", type=int, default=20, help="number of held-out scenes")
    lens_study.add_argument("--model", default=DEFAULT_MODEL)
    lens_study.add_argument("--device", default="auto")
    lens_study.add_argument("--top-k", type=int, default=5)
    lens_study.add_argument("--out", required=True, help="output folder for logit_lens_study.json")


def write_staged(out, files: dict[str, str]) -> Path:
    """Write the text files into `out` together (staged: nothing half-written)."""
    with staged_folder(out) as staging:
        for name, text in files.items():
            (staging / name).write_text(text)
    return Path(out)


def _parse_ints(spec: str, option: str) -> list[int]:
    try:
        values = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            first, _, last = part.partition("-")
            values += list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise UserInputError(f"{option} must be numbers or ranges like 3, 2-5 or 1,4; got {spec!r}") from None
    if not values:
        raise UserInputError(f"{option} is empty")
    return values


def _box(spec: str | None):
    if spec is None:
        return None
    parts = spec.split(",")
    try:
        if len(parts) != 4:
            raise ValueError
        return [float(v) for v in parts]
    except ValueError:
        raise UserInputError(f"--box must be four numbers x0,y0,x1,y1; got {spec!r}") from None


def _mask(path: str | None):
    return None if path is None else (np.asarray(load_image(path)).max(axis=-1) > 127)


def _request(args):
    """Validate the cheap options first, then load the model and generate."""
    if not args.prompt.strip():
        raise UserInputError("--prompt is empty: give a question about the image")
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    options.validate()
    image = load_image(args.image)
    loaded = load_model(args.model, device=args.device)
    return loaded, generate_with_capture(loaded, [image], args.prompt, options)


def _token_set(args, loaded, trace) -> tuple[list[int], dict]:
    trace.check_token_index(args.token)
    positions = select_tokens(loaded, trace, args.set, mask=_mask(args.mask), box=_box(args.box),
                              buffer=args.buffer, k=args.k, seed=args.seed, method=args.method,
                              token_index=args.token)
    if not positions:
        raise UserInputError(f"the {args.set} set is empty for this image: choose another set")
    cells = np.argwhere(positions_to_cells(trace, positions)).tolist()
    return positions, {"kind": args.set, "buffer": args.buffer, "k": args.k, "seed": args.seed,
                       "method": args.method, "positions": positions, "cells": cells}


def _header(trace) -> dict:
    layout = trace.images[0]
    return {"model": trace.model_name, "prompt": trace.prompt, "answer": trace.answer,
            "answer_tokens": trace.answer_texts, "grid": [layout.rows, layout.cols]}


def run_mean_embedding(args) -> Path:
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise UserInputError(f"--out {out} is a folder: give a .safetensors file name")
    loaded = load_model(args.model, device=args.device)
    mean, metadata = mean_embedding_from_folder(loaded, args.images)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    save_mean_embedding(partial, mean, metadata)
    partial.replace(out)
    print(f"wrote {out}: mean of {metadata['n_tokens']} image tokens from {metadata['n_images']} images")
    return out


def run_ablate(args) -> dict:
    if args.replacement == "mean" and not args.mean:
        raise UserInputError("--replacement mean needs --mean FILE (make one with the mean-embedding command), "
                             "or use --replacement zero")
    loaded, trace = _request(args)
    mean = load_mean_embedding(args.mean, loaded) if args.replacement == "mean" else None
    positions, token_set = _token_set(args, loaded, trace)
    result = ablate(loaded, trace, positions, args.replacement, mean, args.token)
    record = {**_header(trace), "token_set": token_set, "ablation": result.to_json()}
    write_staged(args.out, {"ablation.json": json.dumps(record, indent=2)})
    print(f"p({result.target.strip()!r}) {result.prob_before:.4f} -> {result.prob_after:.4f}; answer "
          f"{result.answer_before!r} -> {result.answer_after!r} ({len(positions)} tokens, {args.replacement})")
    return record


def run_knockout(args) -> dict:
    windows = [w.strip() for w in args.windows.split(",") if w.strip()]
    queries = _parse_ints(args.queries, "--queries") if args.queries else None
    loaded, trace = _request(args)
    keys, token_set = _token_set(args, loaded, trace)
    result = knockout(loaded, trace, keys, args.token, queries, windows)
    record = {**_header(trace), "token_set": token_set, "knockout": result.to_json()}
    figure = knockout_figure(result).to_html(include_plotlyjs="cdn", full_html=True)
    write_staged(args.out, {"knockout.json": json.dumps(record, indent=2), "knockout.html": figure})
    for window, drop in zip(result.windows, result.drops()):
        print(f"{window.window:<14} layers {window.layers[0]}-{window.layers[-1]}: p {window.prob:.4f} "
              f"(drop {100 * drop:.1f}%)")
    return record


def run_logit_lens(args) -> dict:
    loaded, trace = _request(args)
    layers = None if args.layers.strip() == "all" else _parse_ints(args.layers, "--layers")
    lens = logit_lens(loaded, trace, args.top_k, layers)
    record = {**_header(trace), "logit_lens": lens.to_json()}
    write_staged(args.out, {"logit_lens.json": json.dumps(record)})
    print(f"wrote {Path(args.out) / 'logit_lens.json'}: top {args.top_k} of {lens.rows}x{lens.cols} patches "
          f"at layers {lens.layers}")
    return record


def _study(args, compute, file_name: str) -> dict:
    """Check the common options, run `compute(loaded, progress)` and write its result as `file_name`."""
    if args.n < 1:
        raise UserInputError(f"--n must be at least 1, got {args.n}")
    if getattr(args, "buffer", 0) < 0:
        raise UserInputError(f"--buffer must be 0 or more, got {args.buffer}")
    loaded = load_model(args.model, device=args.device)
    result = {"model": args.model,
              **compute(loaded, lambda i, n: print(f"\r{i}/{n} scenes", end="", file=sys.stderr))}
    print(file=sys.stderr)
    write_staged(args.out, {file_name: json.dumps(result, indent=2)})
    return result


def run_ablation_study(args) -> dict:
    def compute(loaded, progress):
        mean = load_mean_embedding(args.mean, loaded) if args.mean else default_mean_embedding(loaded)
        return ablation_study(loaded, args.n, mean, args.buffer, progress=progress)

    result = _study(args, compute, "study.json")
    print(f"{result['n_questions']} questions on {args.n} held-out scenes ({args.model}), buffer {args.buffer}; "
          f"over the {result['summary'].get('none', {}).get('n', 0)} answered correctly without ablation:")
    print(table(result))
    return result


def run_knockout_study(args) -> dict:
    result = _study(args, lambda loaded, progress: knockout_study(loaded, args.n, args.buffer, progress=progress),
                    "knockout_study.json")
    print(f"{result['n_questions']} questions answered right on {args.n} held-out scenes ({args.model}), "
          f"buffer {args.buffer}; attention blocked from the position predicting the answer:")
    print(knockout_table(result))
    return result


def run_logit_lens_study(args) -> dict:
    result = _study(args, lambda loaded, progress: lens_word_share(loaded, args.n, args.top_k, progress=progress),
                    "logit_lens_study.json")
    print(f"{result['n_object_patches']} object patches on {args.n} held-out scenes ({args.model}): share whose top "
          f"{args.top_k} tokens hold the object's word")
    print("| layer | colour word | shape word |\n|---|---|---|")
    for layer, colour, shape in zip(result["layers"], result["colour_share"], result["shape_share"]):
        print(f"| {layer} | {colour:.3f} | {shape:.3f} |")
    return result


def run(args):
    return {"mean-embedding": run_mean_embedding, "ablate": run_ablate, "knockout": run_knockout,
            "logit-lens": run_logit_lens, "ablation-study": run_ablation_study, "knockout-study": run_knockout_study,
            "logit-lens-study": run_logit_lens_study}[args.command](args)
