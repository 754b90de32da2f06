"""How long iGOS++ takes (not part of the suite): one token's mask, the answer-level mask (its visually relevant
tokens together) and every token's mask batched, each on a fresh trace (so each pays for the blurred baseline and
the pixel map). `python -m tests.bench_igos [--model demo] [--option NAME=VALUE ...]` on the shipped example scene
of a green square and a blue circle; targets on the demo model at the defaults: one token <= 5 s, the answer <= 10 s."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone

import torch

from lvlm_interpret import GenerationOptions, generate_with_capture, get_method, load_image, load_model
from lvlm_interpret.resources import EXAMPLES_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--word", default="square", help="the answer word of the one-token figure")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="an igos option")
    args = parser.parse_args()
    options = {name: json.loads(value) for name, _, value in (spec.partition("=") for spec in args.option)}
    loaded = load_model(args.model, dtype=args.dtype)
    image = load_image(EXAMPLES_DIR / "green-square-blue-circle.png")
    method = get_method("igos")
    method.check_options(options)

    def fresh_trace():
        return generate_with_capture(loaded, [image], "Describe the image.", GenerationOptions(max_new_tokens=16))

    trace = fresh_trace()
    words = [text.strip() for text in trace.answer_texts]
    token = words.index(args.word) if args.word in words else 0
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, model {args.model}, options {options}")
    print(f"answer: {trace.answer!r} ({trace.n_answer} tokens); one token: {words[token]!r} (token {token})")
    start = time.perf_counter()
    one = method.explain(trace, token, model=loaded, **options)
    print(f"one token: {time.perf_counter() - start:.2f} s ({one.details['iterations']} iterations)")
    trace = fresh_trace()
    start = time.perf_counter()
    answer = method.explain_answer(trace, model=loaded, **options)
    print(f"whole answer (tokens {answer.details['tokens']} together): {time.perf_counter() - start:.2f} s "
          f"({answer.details['iterations']} iterations)")
    trace = fresh_trace()
    start = time.perf_counter()
    every = method.explain_many(trace, list(range(trace.n_answer)), model=loaded, **options)
    print(f"every token's own mask, batched ({trace.n_answer} masks): {time.perf_counter() - start:.2f} s "
          f"(iterations {[e.details['iterations'] for e in every]})")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
