"""Speed and size figures: plain generation, generation with capture, each method per token and for all tokens;
`report_markdown` turns the figures of several runs into one page (docs/results-gpu.md)."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from .capture import CAPTURE_ATTENTION, GenerationOptions, generate_with_capture, replay_inputs
from .demo.scenes import DESCRIBE_PROMPT, draw_scene
from .errors import UserInputError
from .methods import get_method

CAPTURE_OVERHEAD_TARGET = 1.3  # generation with capture / plain generation


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _timed(function, repeats: int) -> tuple[list[float], object]:
    """Each call's seconds, in order, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, result


def environment(device: torch.device) -> dict:
    """When and on what the figures were taken."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device_name": device_name,
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__}


def run_bench(loaded, answer_tokens: int = 16, methods=("attention", "tam", "relevancy", "cleann"),
              repeats: int = 3, image_size: int = 192, method_options: dict | None = None) -> dict:
    image = draw_scene(10 ** 9, image_size).image
    options = GenerationOptions(max_new_tokens=answer_tokens, min_new_tokens=answer_tokens)
    model = loaded.model
    if loaded.device.type == "cuda":  # the peak of this run, the weights included
        torch.cuda.reset_peak_memory_stats(loaded.device)

    def plain():
        inputs = loaded.processor(images=[image], text=_chat(loaded), return_tensors="pt").to(loaded.device)
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=answer_tokens, min_new_tokens=answer_tokens,
                                  do_sample=False, temperature=None, top_p=None, top_k=None,
                                  pad_token_id=loaded.processor.tokenizer.pad_token_id)

    model.set_attn_implementation("sdpa")
    try:
        plain()  # warm-up
        plain_s = statistics.median(_timed(plain, repeats)[0])
    finally:
        model.set_attn_implementation(CAPTURE_ATTENTION)
    capture_times, trace = _timed(lambda: generate_with_capture(loaded, [image], DESCRIBE_PROMPT, options), repeats)
    capture_s = statistics.median(capture_times)
    figures = {"model": loaded.name, "device": str(loaded.device), "dtype": str(model.dtype).removeprefix("torch."),
               "repeats": repeats, "image_size": image_size, "environment": environment(loaded.device),
               "answer_tokens": trace.n_answer, "prompt_tokens": trace.prompt_length, "plain_generation_s": plain_s,
               "capture_generation_s": capture_s, "capture_overhead_x": capture_s / plain_s,
               "trace_bytes": trace.nbytes, "method_options": method_options or {}, "methods": {}}
    token, all_tokens = trace.n_answer // 2, list(range(trace.n_answer))

    # The methods first, on the fresh trace: each one's first call is what a first click on a token costs.
    for name in methods:
        method, options = get_method(name), (method_options or {}).get(name, {})
        times, _ = _timed(lambda: method.explain(trace, token, model=loaded, **options), repeats)
        one_s = statistics.median(times)
        row = {"first_click_s": times[0], "one_token_s": one_s, "one_token_x_plain": one_s / plain_s}
        if name != "cleann":  # CLEANN is a per-click search, not run over whole answers
            all_s = statistics.median(_timed(lambda: method.explain_many(trace, all_tokens, model=loaded, **options),
                                             repeats)[0])
            row.update({"all_tokens_s": all_s, "all_tokens_x_plain": all_s / plain_s})
        figures["methods"][name] = row
    if "relevancy" in methods:
        relevancy = figures["methods"]["relevancy"]
        sequential_s = _timed(lambda: [get_method("relevancy").explain(trace, t, model=loaded)
                                       for t in all_tokens], 1)[0][0]
        relevancy["all_tokens_one_at_a_time_s"] = sequential_s
        relevancy["batched_speedup_x"] = sequential_s / relevancy["all_tokens_s"]

    def forward_backward():
        """The yardstick for one token's relevancy: a plain (SDPA) forward over the final sequence and the backward
        of one answer token's logit through the whole model to the input pixels (activation gradients only, as
        any attribution needs; no weight gradients)."""
        inputs = replay_inputs(trace, loaded.device)
        inputs["pixel_values"] = inputs["pixel_values"].clone().requires_grad_()
        model.set_attn_implementation("sdpa")
        try:
            with torch.enable_grad():
                logits = model(**inputs).logits[0]
                target = logits[trace.source_position(token), trace.answer_ids[token]]
                torch.autograd.grad(target, inputs["pixel_values"])
        finally:
            model.set_attn_implementation(CAPTURE_ATTENTION)

    figures["forward_backward_s"] = statistics.median(_timed(forward_backward, repeats)[0])
    for row in figures["methods"].values():
        row["one_token_x_forward_backward"] = row["one_token_s"] / figures["forward_backward_s"]
    figures["peak_memory_mb"] = _peak_memory_mb(loaded.device)
    return figures


def _chat(loaded) -> str:
    content = [{"type": "image"}, {"type": "text", "text": DESCRIBE_PROMPT}]
    return loaded.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                tokenize=False)


# --- the figures of several runs as one markdown page --------------------------------------------------------------
_REPORTED = ("model", "command", "environment", "device", "dtype", "repeats", "prompt_tokens", "answer_tokens",
             "plain_generation_s", "capture_generation_s", "capture_overhead_x", "trace_bytes", "forward_backward_s",
             "methods", "peak_memory_mb")


def read_figures(path) -> dict:
    """The figures `python -m lvlm_interpret bench --out PATH` wrote, checked for what the page reports."""
    try:
        figures = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UserInputError(f"cannot read bench figures {path}: {error}") from None
    missing = [key for key in _REPORTED if key not in figures] if isinstance(figures, dict) else list(_REPORTED)
    if missing:
        raise UserInputError(f"{path} is not a figures file of `python -m lvlm_interpret bench --out` (it lacks "
                             f"{', '.join(missing)}): run bench again with this version")
    return figures


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value >= 1 else f"{value * 1e3:.3g} ms"


def _megabytes(value: float) -> str:
    return f"{value / 1024:.1f} GB" if value >= 1024 else f"{value:.3g} MB"


def _method_cells(run: dict, name: str) -> str:
    row = run["methods"].get(name)
    if row is None:
        return "not run"
    cells = [_seconds(row["first_click_s"]), _seconds(row["one_token_s"])]
    return " / ".join(cells + ([_seconds(row["all_tokens_s"])] if "all_tokens_s" in row else ["-"]))


def report_markdown(runs: list[dict], command: str) -> str:
    """One table, a column per run: generation with and without capture, each method's first click, one token
    and all tokens, relevancy batched vs one token at a time, peak memory; with each run's date, machine and
    versions, and the commands."""
    def line(label, cell):
        return f"| {label} | " + " | ".join(cell(run) for run in runs) + " |"

    def versions(run):
        env = run["environment"]
        cuda = f" (CUDA {env['cuda']})" if env["cuda"] else ""
        return f"torch {env['torch']}{cuda}, transformers {env['transformers']}, Python {env['python']}"

    def overhead(run):
        met = "met" if run["capture_overhead_x"] <= CAPTURE_OVERHEAD_TARGET else "**missed**"
        return f"{_seconds(run['capture_generation_s'])} (**{run['capture_overhead_x']:.2f}x**; target " \
               f"<= {CAPTURE_OVERHEAD_TARGET}x: {met})"

    def relevancy_batched(run):
        relevancy = run["methods"].get("relevancy")
        return "not run" if relevancy is None else f"{_seconds(relevancy['all_tokens_s'])} / " \
            f"{_seconds(relevancy['all_tokens_one_at_a_time_s'])} ({relevancy['batched_speedup_x']:.1f}x)"

    def peak_memory(run):
        how = "torch.cuda.max_memory_allocated" if run["device"].startswith("cuda") else "process max RSS"
        return f"{_megabytes(run['peak_memory_mb'])} ({how})"

    methods = list(dict.fromkeys(name for run in runs for name in run["methods"]))
    return "\n".join([
        "# Speed and memory: generation with capture and the explanation methods", "",
        f"Written by `{command}`, from these `bench` runs (lvlm_interpret/bench.py) on random-weight models with",
        "the real models' shapes (configs/random-*.json):", "",
        "```", *(run["command"] for run in runs), "```", "",
        "Timings are medians over the run's repeats, with CUDA synchronised around each call. A method's first",
        "click is its first call for one token on the fresh trace, right after generation; one token is the median",
        "over the repeats; all tokens is one batched call over the whole answer (CLEANN is a per-click search: no",
        "all-tokens figure).", "",
        "| | " + " | ".join(f"`{run['model']}`" for run in runs) + " |",
        "|---" * (len(runs) + 1) + "|",
        line("date", lambda run: run["environment"]["date"]),
        line("device", lambda run: f"{run['environment']['device_name']}, {run['device']}, {run['dtype']}"),
        line("versions", versions),
        line("method options", lambda run: "; ".join(
            f"{name}: " + ", ".join(f"{key}={value}" for key, value in options.items())
            for name, options in run.get("method_options", {}).items()) or "the defaults"),
        line("tokens (prompt + answer), repeats",
             lambda run: f"{run['prompt_tokens']} + {run['answer_tokens']}, {run['repeats']}"),
        line("plain generation (SDPA, no capture)", lambda run: _seconds(run["plain_generation_s"])),
        line("generation with capture", overhead),
        line("Trace size", lambda run: _megabytes(run["trace_bytes"] / 2 ** 20)),
        line("forward + backward of one logit (relevancy's yardstick)",
             lambda run: _seconds(run["forward_backward_s"])),
        *(line(f"{name}: first click / one token / all tokens", lambda run, name=name: _method_cells(run, name))
          for name in methods),
        line("relevancy, all tokens batched / one at a time", relevancy_batched),
        line("peak memory", peak_memory),
    ]) + "\n"


def write_report(figure_paths: list[str], command: str, out) -> Path:
    """docs/results-gpu.md (or `out`) from the figures files of `bench --out`."""
    if not figure_paths:
        raise UserInputError("name at least one figures file written by `python -m lvlm_interpret bench --out`")
    page = report_markdown([read_figures(path) for path in figure_paths], command)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
