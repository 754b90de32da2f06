"""Held-out accuracy of a demo model with greedy generation, per question kind.

    python -m lvlm_interpret.demo.evaluate --model assets/demo-model --n 300

Held-out scenes use seeds HELD_OUT_SEED_START + i (training uses lower seeds). Answers come from the
product's own loading and generation path. Each scene is asked "Describe the image.",
"How many shapes are there?", every unambiguous colour and shape question, and four "Is there" questions (two
yes, two no, mostly hard negatives). Answers are compared after lower-casing and dropping a final period.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from ..capture import GenerationOptions, generate_with_capture
from ..models.loading import load_model
from .scenes import HELD_OUT_SEED_START, KINDS, draw_scene, normalise_answer, question_kind, sample_questions

def ask(loaded, image, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy answer through the product's own path (the same loading, prompt format and generation)."""
    return generate_with_capture(loaded, [image], prompt, GenerationOptions(max_new_tokens=max_new_tokens)).answer


def evaluate(loaded, n: int = 300, size=192, verbose: bool = False, n_exists: int = 4):
    correct = {k: 0 for k in KINDS}
    total = {k: 0 for k in KINDS}
    failures = []
    for i in range(n):
        seed = HELD_OUT_SEED_START + i
        scene = draw_scene(seed, size=size)
        for prompt, answer in sample_questions(scene, random.Random(seed), n_exists=n_exists):
            kind = question_kind(prompt)
            got = ask(loaded, scene.image, prompt)
            ok = normalise_answer(got) == normalise_answer(answer)
            total[kind] += 1
            correct[kind] += ok
            if not ok:
                failures.append({"seed": seed, "prompt": prompt, "expected": answer, "got": got})
                if verbose:
                    print(f"  seed {seed}: {prompt!r} expected {answer!r} got {got!r}", flush=True)
    return {k: correct[k] / max(1, total[k]) for k in KINDS}, total, failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/demo-model")
    p.add_argument("--n", type=int, default=300, help="held-out scenes")
    p.add_argument("--size", default="192", help="image size: a side (192) or WIDTHxHEIGHT (240x160)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--verbose", action="store_true", help="print every wrong answer")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.size.lower().split("x")) if "x" in args.size.lower() else int(args.size)
    loaded = load_model(args.model, device="cpu")
    t0 = time.time()
    acc, total, failures = evaluate(loaded, args.n, size=size, verbose=args.verbose)
    print(f"{args.model}: {args.n} held-out scenes (seeds {HELD_OUT_SEED_START}..{HELD_OUT_SEED_START + args.n - 1}), "
          f"size {args.size}, greedy generation, {time.time() - t0:.0f}s")
    print("| kind | questions | exact accuracy |")
    print("|---|---|---|")
    for kind in KINDS:
        print(f"| {kind} | {total[kind]} | {acc[kind] * 100:.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"accuracy": acc, "total": total, "failures": failures[:200], "n": args.n,
                       "size": args.size}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
