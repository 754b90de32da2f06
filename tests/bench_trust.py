"""How long "which map to trust" takes for one word (not part of the suite): each method's map first, then the
judgement of all of them. `python -m tests.bench_trust [--model demo] [--word red]` on the shipped example scene of
a yellow and a red square and a blue triangle."""

from __future__ import annotations

import argparse
import os
import time

from lvlm_interpret import METHODS, ExplainService, load_image
from lvlm_interpret.resources import EXAMPLES_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--word", default="red", help="an answer word to judge (its first occurrence)")
    args = parser.parse_args()
    service = ExplainService(default_model=args.model, device="cpu")
    image = load_image(EXAMPLES_DIR / "yellow-square-red-square-blue-triangle.png")
    request_id, trace = service.generate([image], "Describe the image.")
    words = [text.strip() for text in trace.answer_texts]
    token = words.index(args.word) if args.word in words else 0
    print(f"answer: {trace.answer!r}; judging {words[token]!r} (token {token})")
    for method in sorted(METHODS):
        start = time.perf_counter()
        service.explain(request_id, method, token)
        print(f"{method}: {time.perf_counter() - start:.3f} s")
    start = time.perf_counter()
    trust = service.trust(request_id, token)
    print(f"trust, the maps computed: {time.perf_counter() - start:.2f} s")
    print(f"verdict: {trust['verdict']}")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
