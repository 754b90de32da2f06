"""Command line: `python -m lvlm_interpret explain --image PATH --prompt TEXT --out DIR`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path


from .analysis import commands as analysis_commands
from .capture import GenerationOptions, generate_with_capture
from .compare import DEFAULT_METHODS as DEFAULT_COMPARED_METHODS
from .compare import compare_requests, generate_pair
from .errors import UserInputError
from .export import request_record, staged_folder, write_request
from .images import load_image
from .methods import METHODS, get_method
from .methods.base import check_method_options
from .methods.igos import answer_summary
from .methods.visual_relevance import visually_relevant_tokens
from .models.loading import DEFAULT_MODEL, load_model, quiet_loading_logs
from .sae import commands as sae_commands


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise UserInputError(message)


# CLEANN searches and verifies a causal set per token, iGOS++ optimises a mask per token: `all` includes them only
# for tokens named with --tokens.
PER_TOKEN_ONLY = ("cleann", "igos")


def _parse_methods(spec: str, tokens_given: bool) -> list[str]:
    if spec.strip() == "all":
        names = [n for n in sorted(METHODS) if tokens_given or n not in PER_TOKEN_ONLY]
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserInputError("--methods is empty: name at least one of " + ", ".join(sorted(METHODS)))
    for name in names:
        get_method(name)
    return list(dict.fromkeys(names))


def _parse_method_options(specs: list[str] | None, methods: list[str]) -> dict[str, dict]:
    """`--option METHOD.NAME=VALUE` (repeatable) as {method: {name: value}}; values read as JSON where they can be
    (20, 1e-5, true, null), as text otherwise."""
    options: dict[str, dict] = {}
    for spec in specs or []:
        key, equals, text = spec.partition("=")
        method, dot, name = key.strip().partition(".")
        if not (equals and dot and method and name.strip()):
            raise UserInputError(f"--option must look like METHOD.NAME=VALUE (e.g. cleann.head=3), got {spec!r}")
        if method not in methods:
            raise UserInputError(f"--option {spec!r}: {method} is not among the methods run ({', '.join(methods)})")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        options.setdefault(method, {})[name.strip()] = value
    return check_method_options(options)


def _parse_tokens(spec: str) -> list[int] | None:
    if spec.strip() == "all":
        return None
    try:
        indices = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UserInputError(f"--tokens must be 'all' or comma-separated indices like 0,2,5; got {spec!r}") from None
    if not indices or any(i < 0 for i in indices):
        raise UserInputError(f"--tokens must list non-negative answer-token indices; got {spec!r}")
    return list(dict.fromkeys(indices))


def _add_dataset_arguments(parser) -> None:
    """--dataset and what chooses its samples, for evaluate and compare-models."""
    parser.add_argument("--dataset", default="shapes", choices=["shapes", "coco"],
                        help="shapes: held-out demo scenes; coco: a local COCO-format set (--images, --annotations)")
    parser.add_argument("--n", type=int, default=None, help="number of samples (shapes: 100; coco: every image)")
    parser.add_argument("--size", type=int, default=192, help="shapes: scene side in pixels")
    parser.add_argument("--images", help="coco: folder of the images")
    parser.add_argument("--annotations", help="coco: instances JSON with segmentations")
    parser.add_argument("--prompt", default=None, help="coco: the prompt (default: Describe the image.)")
    parser.add_argument("--max-new-tokens", type=int, default=24)


def build_parser() -> argparse.ArgumentParser:
    program = "lvlm-interpret" if Path(sys.argv[0]).name == "lvlm-interpret" else "python -m lvlm_interpret"
    parser = _Parser(prog=program, description="Explain what a vision-language model looked at.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    explain = commands.add_parser("explain", help="generate an answer and write maps for its tokens")
    explain.add_argument("--image", required=True, action="append", help="image file (repeat for several images)")
    explain.add_argument("--prompt", required=True, help="the question or instruction")
    explain.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local folder or random:PRESET "
                                                                f"(default {DEFAULT_MODEL})")
    explain.add_argument("--methods", default="attention",
                         help=f"comma list of {', '.join(sorted(METHODS))}, or all (cleann and igos only with "
                              "--tokens)")
    explain.add_argument("--max-new-tokens", type=int, default=32)
    explain.add_argument("--temperature", type=float, default=0.0, help="sample with this temperature "
                                                                        "(default 0: greedy)")
    explain.add_argument("--top-p", type=float, default=1.0)
    explain.add_argument("--seed", type=int, default=0)
    explain.add_argument("--tokens", default="all", help="answer tokens to explain: all, or indices like 0,2")
    explain.add_argument("--layers", default="all", help="attention layers: all, 3, 2-5 or 1,4")
    explain.add_argument("--heads", default="all", help="attention heads: all, 3, 0-7 or 1,4")
    explain.add_argument("--aggregation", default="mean", choices=["mean", "max"])
    explain.add_argument("--option", action="append", metavar="METHOD.NAME=VALUE",
                         help="a method's option, e.g. cleann.head=3, cleann.layer=-2, relevancy.vision=false, "
                              "tam.denoise=false (repeatable)")
    explain.add_argument("--llr-threshold", type=float, default=1.0,
                         help="log-likelihood ratio (image vs blurred) above which a token is visually relevant")
    explain.add_argument("--device", default="auto")
    explain.add_argument("--dtype", default="auto")
    explain.add_argument("--device-map", default=None, help="accelerate device map, e.g. auto, for large models")
    explain.add_argument("--trust-remote-code", action="store_true")
    explain.add_argument("--png", action="store_true", help="also write one overlay PNG per method and token")
    explain.add_argument("--save-trace", action="store_true", help="also write trace.safetensors")
    explain.add_argument("--trust", action="store_true",
                         help="also judge the maps of each explained token: deletion / insertion AUC, agreement "
                              "between maps, the image share of relevancy and a verdict (result.json \"trust\")")
    explain.add_argument("--out", required=True, help="output folder")

    evaluate = commands.add_parser("evaluate", help="score explanation methods against ground-truth masks")
    _add_dataset_arguments(evaluate)
    evaluate.add_argument("--methods", default="attention,relevancy,tam")
    evaluate.add_argument("--model", default=DEFAULT_MODEL)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--option", action="append", metavar="METHOD.NAME=VALUE",
                          help="a method's option, as for explain (repeatable)")
    evaluate.add_argument("--faithfulness", action="store_true",
                          help="also deletion / insertion AUC (one forward per 2%% of cells: slow)")
    evaluate.add_argument("--min-blur-effect", type=float, default=None,
                          help="with --faithfulness: score deletion / insertion only on words whose probability the "
                               "blur changes by at least this much (default 0.5; every word's curves are written)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.add_argument("--out", required=True, help="output folder for evaluation.json and evaluation.csv")

    bench = commands.add_parser("bench", help="time generation, capture and every method; write figures as JSON")
    bench.add_argument("--model", default=DEFAULT_MODEL)
    bench.add_argument("--device", default="auto")
    bench.add_argument("--dtype", default="auto")
    bench.add_argument("--answer-tokens", type=int, default=16)
    bench.add_argument("--methods", default="attention,tam,relevancy,cleann")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--image-size", type=int, default=192, help="side of the benchmark scene in pixels")
    bench.add_argument("--option", action="append", metavar="METHOD.NAME=VALUE",
                       help="a method's option, as for explain (repeatable), e.g. igos.iterations=1 for a CPU run")
    bench.add_argument("--out", required=True, help="JSON file for the figures")
    bench_report = commands.add_parser("bench-report", help="write the figures of bench runs as one markdown page")
    bench_report.add_argument("figures", nargs="+", help="JSON files written by bench --out, one column each")
    bench_report.add_argument("--written-by", default="python -m lvlm_interpret bench-report",
                              help="the command that ran the benches, named on the page (e.g. make gpu-check)")
    bench_report.add_argument("--out", required=True, help="markdown file, e.g. docs/results-gpu.md")

    compare = commands.add_parser("compare", help="explain two requests (prompt, image and / or model changed) and "
                                                  "compare their aligned words' maps")
    compare.add_argument("--image", required=True, help="request A's image file")
    compare.add_argument("--image-b", default=None, help="request B's image (default: A's)")
    compare.add_argument("--prompt", required=True, help="request A's question or instruction")
    compare.add_argument("--prompt-b", default=None, help="request B's prompt (default: A's)")
    compare.add_argument("--model", default=DEFAULT_MODEL, help=f"request A's model (default {DEFAULT_MODEL})")
    compare.add_argument("--model-b", default=None, help="request B's model (default: A's)")
    compare.add_argument("--methods", default=",".join(DEFAULT_COMPARED_METHODS),
                         help=f"comma list of {', '.join(sorted(METHODS))}, or all (without cleann)")
    compare.add_argument("--max-new-tokens", type=int, default=32)
    compare.add_argument("--option", action="append", metavar="METHOD.NAME=VALUE",
                         help="a method's option, as for explain (repeatable)")
    compare.add_argument("--llr-threshold", type=float, default=1.0)
    compare.add_argument("--device", default="auto")
    compare.add_argument("--png", action="store_true", help="also write DIR/a/overlays and DIR/b/overlays")
    compare.add_argument("--out", required=True, help="output folder: a/, b/ (explain's contract) and compare.json")

    compare_models = commands.add_parser("compare-models", help="where two models look over a dataset: statistics "
                                                                "per model and a paired test per statistic")
    _add_dataset_arguments(compare_models)
    compare_models.add_argument("--model", default=DEFAULT_MODEL, help="model A")
    compare_models.add_argument("--model-b", required=True, help="model B")
    compare_models.add_argument("--device", default="auto")
    compare_models.add_argument("--no-progress", action="store_true", help="no progress bar")
    compare_models.add_argument("--out", required=True, help="output folder for compare-models.json, .md and .html")

    serve = commands.add_parser("serve", help="run the service over HTTP (OpenAPI schema at /docs)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", default=DEFAULT_MODEL)
    serve.add_argument("--device", default="auto")
    serve.add_argument("--cache-mb", type=int, default=1024, help="bound of the trace and map cache")
    serve.add_argument("--concurrency", type=int, default=1, help="requests computed at the same time")
    serve.add_argument("--queue", type=int, default=16, help="requests that may wait; more get 503 (busy, retry)")
    serve.add_argument("--hosted", action="store_true", help="public-demo limits from configs/hosted.json")
    analysis_commands.add_parsers(commands)
    sae_commands.add_parsers(commands)
    return parser


def run_serve(args) -> None:
    import uvicorn

    from .server import serving_api

    api = serving_api(args.model, args.device, args.hosted, args.cache_mb, args.concurrency, args.queue)
    uvicorn.run(api, host=args.host, port=args.port, log_level="warning")


def run_bench_command(args) -> dict:
    from .bench import run_bench

    if not 1 <= args.answer_tokens <= 1024:
        raise UserInputError(f"--answer-tokens must be between 1 and 1024, got {args.answer_tokens}")
    if not 32 <= args.image_size <= 4096:
        raise UserInputError(f"--image-size must be between 32 and 4096 pixels, got {args.image_size}")
    methods = _parse_methods(args.methods, tokens_given=True)
    method_options = _parse_method_options(args.option, methods)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    figures = {"command": _command_line(args), **run_bench(loaded, args.answer_tokens, methods,
                                                           repeats=max(1, args.repeats), image_size=args.image_size,
                                                           method_options=method_options)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    return figures


def _command_line(args) -> str:
    """The command that reproduces `args` (of a command whose options all take a value), every option spelled out
    (a repeatable one once per value, none when not given)."""
    options = [word for name, value in vars(args).items() if name != "command" and value is not None
               for item in (value if isinstance(value, list) else [value])
               for word in (f"--{name.replace('_', '-')}", str(item))]
    return shlex.join(["python", "-m", "lvlm_interpret", args.command, *options])


def run_bench_report(args) -> Path:
    from .bench import write_report

    return write_report(args.figures, args.written_by, args.out)


def _dataset(args):
    """(n, sample_at, about) of evaluate's and compare-models' --dataset options; a bad one fails here."""
    if args.n is not None and args.n < 1:
        raise UserInputError(f"--n must be at least 1, got {args.n}")
    if not 1 <= args.max_new_tokens <= 1024:
        raise UserInputError(f"--max-new-tokens must be between 1 and 1024, got {args.max_new_tokens}")
    if args.dataset == "coco":
        from .evaluation.coco import DEFAULT_PROMPT, CocoDataset

        if not args.images or not args.annotations:
            raise UserInputError("--dataset coco needs --images FOLDER and --annotations FILE")
        if args.prompt is not None and not args.prompt.strip():
            raise UserInputError("--prompt is empty: give the question to ask about every image")
        dataset = CocoDataset(args.images, args.annotations, args.prompt or DEFAULT_PROMPT)
        n = len(dataset) if args.n is None else args.n
        dataset.check(n)
        return n, dataset.sample, {"images": args.images, "annotations": args.annotations, "prompt": dataset.prompt}
    from .demo.scenes import HELD_OUT_SEED_START
    from .evaluation.shapes import shapes_sample

    if args.images or args.annotations:
        raise UserInputError("--images and --annotations are for --dataset coco")
    n = 100 if args.n is None else args.n
    return n, lambda index: shapes_sample(index, args.size), {"size": args.size, "seed_start": HELD_OUT_SEED_START}


def run_evaluate(args) -> dict:
    """Under `accelerate launch` every process evaluates its share; the main process writes and prints."""
    from .evaluation.benchmark import COLUMNS, MIN_BLUR_EFFECT, process_state, run_benchmark

    methods = _parse_methods(args.methods, tokens_given=True)
    method_options = _parse_method_options(args.option, methods)
    min_blur_effect = MIN_BLUR_EFFECT if args.min_blur_effect is None else args.min_blur_effect
    if not 0 < min_blur_effect <= 1:
        raise UserInputError(f"--min-blur-effect must be a probability change in (0, 1], got {min_blur_effect}")
    n, sample_at, about = _dataset(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    state = process_state()
    loaded = load_model(args.model, device=state.device if state.num_processes > 1 else args.device)
    summary = run_benchmark(loaded, sample_at, n, methods, method_options, faithfulness=args.faithfulness,
                            max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                            min_blur_effect=min_blur_effect)
    result = {"model": args.model, "dataset": args.dataset, "n_samples": n, **about, "method_options": method_options,
              **summary}
    if not state.is_main_process:
        return result
    lines = ["method," + ",".join(COLUMNS)]
    lines += [name + "," + ",".join(str(row.get(c, "")) for c in COLUMNS) for name, row in result["methods"].items()]
    with staged_folder(out) as staging:
        (staging / "evaluation.json").write_text(json.dumps(result, indent=2))
        (staging / "evaluation.csv").write_text("\n".join(lines) + "\n")
    accuracy = result["answer_accuracy"]
    print(f"{args.dataset}: {n} samples, {result['processes']} process(es), model {args.model}"
          + ("" if accuracy is None else f", answer accuracy {accuracy:.3f}"))
    print(f"{'map':<16}" + "".join(f"{c[:12]:>14}" for c in COLUMNS))
    for name, row in result["methods"].items():
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in COLUMNS]
        print(f"{name:<16}" + "".join(f"{c:>14}" for c in cells))
    return result


def run_compare(args) -> Path:
    """DIR/a and DIR/b in explain's contract (every answer token, the chosen methods) and DIR/compare.json."""
    from .service import ExplainService

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    methods = _parse_methods(args.methods, tokens_given=False)
    method_options = _parse_method_options(args.option, methods)
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    options.validate()
    image = load_image(args.image)
    image_b = None if args.image_b is None else load_image(args.image_b)
    service = ExplainService(default_model=args.model, device=args.device)
    request_a, request_b = generate_pair(service, image, args.prompt, args.model, image_b, args.prompt_b,
                                         args.model_b, options)
    comparison = compare_requests(service, request_a, request_b, methods, method_options)
    with staged_folder(out) as staging:
        for side, request_id in (("a", request_a), ("b", request_b)):
            trace = service.trace(request_id)
            tokens = list(range(trace.n_answer))
            explanations = {name: [service.explain(request_id, name, t, **method_options.get(name, {}))
                                   for t in tokens] for name in methods}
            record = request_record(trace, tokens, explanations,
                                    service.visual_relevance(request_id, args.llr_threshold), method_options)
            write_request(staging / side, trace, record, explanations, png=args.png)
        (staging / "compare.json").write_text(json.dumps(comparison, indent=2))
    return out


def run_compare_models(args) -> dict:
    """DIR/compare-models.json (per-sample statistics and the paired tests), .md (the table) and .html (Plotly)."""
    from .evaluation.model_comparison import compare_models, figure, markdown_table

    n, sample_at, about = _dataset(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    loaded_a = load_model(args.model, device=args.device)
    loaded_b = load_model(args.model_b, device=args.device)
    result = {"model_a": args.model, "model_b": args.model_b, "dataset": args.dataset, "n_samples": n, **about,
              **compare_models(loaded_a, loaded_b, sample_at, n, args.max_new_tokens, progress=not args.no_progress)}
    table = markdown_table(result, args.model, args.model_b)
    with staged_folder(out) as staging:
        (staging / "compare-models.json").write_text(json.dumps(result, indent=2))
        (staging / "compare-models.md").write_text(table)
        figure(result, args.model, args.model_b).write_html(staging / "compare-models.html", include_plotlyjs=True)
    print(table, end="")
    return result


def run_explain(args) -> Path:
    start = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    tokens = _parse_tokens(args.tokens)
    methods = _parse_methods(args.methods, tokens_given=tokens is not None)
    given_options = _parse_method_options(args.option, methods)  # before the model is loaded: typos fail fast
    if not args.prompt.strip():
        raise UserInputError("--prompt is empty: give a question about the image")
    options = GenerationOptions.from_temperature(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    options.validate()
    images = [load_image(path) for path in args.image]
    timings = {}

    t0 = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                        trust_remote_code=args.trust_remote_code)
    timings["load_model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    trace = generate_with_capture(loaded, images, args.prompt, options)
    timings["generate"] = time.perf_counter() - t0
    indices = list(range(trace.n_answer)) if tokens is None else tokens
    for index in indices:
        trace.check_token_index(index)

    method_options = {"attention": {"layers": args.layers, "heads": args.heads, "aggregation": args.aggregation}}
    for name, given in given_options.items():
        method_options[name] = {**method_options.get(name, {}), **given}
    explanations = {}
    for name in methods:
        t0 = time.perf_counter()
        explanations[name] = get_method(name).explain_many(trace, indices, model=loaded,
                                                           **method_options.get(name, {}))
        timings[name] = time.perf_counter() - t0
    answer_maps = []
    if "igos" in explanations:  # iGOS++ also maps the answer's visually relevant tokens together
        t0 = time.perf_counter()
        answer_maps.append(get_method("igos").explain_answer(trace, model=loaded, **method_options.get("igos", {})))
        timings["igos_answer"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    relevance = visually_relevant_tokens(loaded, trace, threshold=args.llr_threshold)
    timings["llr"] = time.perf_counter() - t0
    trust = None
    if args.trust:
        t0 = time.perf_counter()
        trust = _trust(loaded, trace, indices, explanations, method_options.get("relevancy", {}))
        timings["trust"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    record = request_record(trace, indices, explanations, relevance, method_options, timings, trust)
    if answer_maps:
        record["igos"] = answer_summary(loaded, trace, answer_maps[0])
    return write_request(out, trace, record, explanations, png=args.png, save_trace=args.save_trace,
                         answer_maps=answer_maps)


def _trust(loaded, trace, indices: list[int], explanations: dict, relevancy_options: dict) -> dict[int, dict]:
    """The trust entry of every explained token over the maps the run made (relevancy computed for the image
    share where it was not asked for)."""
    from .trust import token_trust

    relevancy = explanations.get("relevancy") or get_method("relevancy").explain_many(
        trace, indices, model=loaded, **relevancy_options)
    trust = {}
    for k, index in enumerate(indices):
        maps = {name: grids[0] for explained in explanations.values()
                for name, grids in explained[k].all_maps().items()}
        trust[index] = token_trust(loaded, trace, index, maps, relevancy[k])
    return trust


def main(argv: list[str] | None = None) -> int:
    quiet_loading_logs()
    try:
        args = build_parser().parse_args(argv)
        if args.command == "explain":
            out = run_explain(args)
            print(f"wrote {out / 'result.json'} and {out / 'maps.npz'}")
        elif args.command == "compare":
            out = run_compare(args)
            print(f"wrote {out / 'compare.json'}, {out / 'a'} and {out / 'b'}")
        elif args.command == "compare-models":
            run_compare_models(args)
        elif args.command == "evaluate":
            run_evaluate(args)
        elif args.command == "bench":
            run_bench_command(args)
        elif args.command == "bench-report":
            print(f"wrote {run_bench_report(args)}")
        elif args.command == "serve":
            run_serve(args)
        elif args.command in analysis_commands.COMMANDS:
            analysis_commands.run(args)
        elif args.command in sae_commands.COMMANDS:
            sae_commands.run(args)
        return 0
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run() -> None:
    """The `lvlm-interpret` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()
