"""Soak test: minutes of mixed requests from concurrent clients against the HTTP backend, in hosted-like bounds.

`python -m lvlm_interpret.soak --minutes 10 --clients 4 --out DIR` starts the backend in this process on the demo
model with the limits of configs/hosted.json (concurrency, queue, time limit, upload and image budgets; no rate
limit, so that the soak's own clients are not throttled) and a small cache bound, so that traces are evicted and
regenerated during the run. Each client generates an answer, then asks for everything a user can ask about it
(every explanation method, the attention overview, reverse attention, visual relevance, every export, the logit
lens, a token set, an ablation and a knockout) in a shuffled order, and starts again until the time is up.
"Busy, retry" answers (503 with Retry-After) are waited out and retried, and counted apart from errors; the RSS of
this process (server and clients) is sampled every few seconds. DIR gets README.md (the tables), rss.html (a
Plotly figure of RSS and latencies over time) and soak.json (the raw figures).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import random
import shlex
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from .analysis.ablation import REPLACEMENTS
from .analysis.token_sets import KINDS as TOKEN_SETS
from .export import EXPORT_KINDS
from .families.base import ImageLayout
from .loadtest import BackgroundServer, Session, make_sessions, process_figures
from .methods import METHODS
from .server import Admission, hosted_bounds
from .service import hosted_limits, hosted_service

MODEL = "demo"
REQUEST_KINDS = ("generate", *(f"explain:{name}" for name in sorted(METHODS)), "attention-overview",
                 "reverse-attention", "visual-relevance", *(f"export:{kind}" for kind in EXPORT_KINDS),
                 "logit-lens", "analysis-tokens", "ablate", "knockout")
TOP_METHODS = ("attention", "tam")  # the cheap maps, for "top" token sets
SAMPLED_SHARE = 1 / 3  # generations sampled with a seed rather than greedy
ANSWER_TOKENS = 8
PERCENTILES = (50, 95, 99)


@dataclass
class SoakRecord:
    """Everything the clients and the sampler saw, shared between their threads."""

    start: float = field(default_factory=time.monotonic)
    requests: list[dict] = field(default_factory=list)  # t_s, kind, latency_s, outcome (ok / busy / error)
    errors: dict[tuple[str, str], int] = field(default_factory=dict)  # (request kind, what went wrong): count
    samples: list[dict] = field(default_factory=list)  # t_s, rss_mb, cache_mb, threads
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, started: float, latency_s: float, outcome: str, error: str | None = None) -> None:
        with self.lock:
            self.requests.append({"t_s": round(started - self.start, 3), "kind": kind,
                                  "latency_s": round(latency_s, 4), "outcome": outcome})
            if error is not None:
                self.errors[(kind, error)] = self.errors.get((kind, error), 0) + 1


def rss_mb() -> float:
    """This process's resident memory now (VmRSS of /proc/self/status)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line: the soak's memory figures need Linux")


def sample_memory(record: SoakRecord, service, every_s: float, stop: threading.Event) -> None:
    while True:
        with record.lock:
            record.samples.append({"t_s": round(time.monotonic() - record.start, 2), "rss_mb": round(rss_mb(), 1),
                                   "cache_mb": round(service.memory()["cache_bytes"] / 2 ** 20, 2),
                                   "threads": threading.active_count()})
        if stop.wait(every_s):
            return


def error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]).splitlines()[0][:160]
    except (ValueError, KeyError, TypeError, IndexError):
        return response.text[:160]


def check_body(kind: str, response: httpx.Response) -> None:
    """An export is a readable, non-empty zip; anything else a JSON object."""
    if kind.startswith("export:"):
        with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
            if not archive.namelist() or archive.testzip() is not None:
                raise ValueError("an empty or corrupt zip")
    elif not isinstance(response.json(), dict):
        raise ValueError("not a JSON object")


def send(client: httpx.Client, record: SoakRecord, kind: str, verb: str, path: str, deadline: float,
         rng: random.Random, **request) -> httpx.Response | None:
    """One request of the soak, recorded; a "busy, retry" answer is waited out (Retry-After, plus up to a quarter
    of it so that waiting clients spread out) and retried while the soak lasts. None when it was not answered."""
    while True:
        started = time.monotonic()
        try:
            response = client.request(verb, path, **request)
        except httpx.HTTPError as error:
            record.add(kind, started, time.monotonic() - started, "error", f"{type(error).__name__}: {error}"[:160])
            return None
        latency_s = time.monotonic() - started
        message = None if response.status_code == 200 else error_message(response)
        if response.status_code == 503 and "Retry-After" in response.headers and "retry" in message:
            record.add(kind, started, latency_s, "busy")
            wait_s = float(response.headers["Retry-After"]) * rng.uniform(1.0, 1.25)
            if time.monotonic() + wait_s > deadline:
                return None
            time.sleep(wait_s)
            continue
        if message is None:
            try:
                check_body(kind, response)
            except (ValueError, zipfile.BadZipFile) as error:
                message = f"bad body: {error}"
        if message is not None:
            record.add(kind, started, latency_s, "error", f"{response.status_code} {message}")
            return None
        record.add(kind, started, latency_s, "ok")
        return response


def generate_request(session: Session, rng: random.Random) -> dict:
    sampled = rng.random() < SAMPLED_SHARE
    form = {"prompt": session.prompt, "max_new_tokens": str(ANSWER_TOKENS),
            "temperature": "0.8" if sampled else "0", "top_p": "0.9" if sampled else "1",
            "seed": str(rng.randrange(2 ** 32))}
    return {"files": {"image": ("scene.png", session.png, "image/png")}, "data": form}


def follow_up(kind: str, summary: dict, rng: random.Random) -> tuple[str, str, dict]:
    """(verb, path, request) of one request `kind` about the generated answer `summary`, with options a user
    might pick (token, cells, heads, token set, positions)."""
    request_id = summary["request_id"]
    token = rng.randrange(len(summary["answer_ids"]))
    layout = ImageLayout.from_json(summary["images"][0])
    cells = layout.views[0].positions
    family, _, name = kind.partition(":")
    if family == "explain":
        options = {"head": rng.randrange(summary["n_heads"])} if name == "cleann" and rng.random() < 0.5 else {}
        return "POST", "/v1/explain", {"json": {"request_id": request_id, "method": name, "token_index": token,
                                                "options": options}}
    if family == "export":
        return "GET", f"/v1/export/{request_id}/{token}/{name}", {}
    if kind == "attention-overview":
        return "GET", f"/v1/attention-overview/{request_id}/{token}", {}
    if kind == "reverse-attention":
        chosen = [[rng.randrange(cells.shape[0]), rng.randrange(cells.shape[1])] for _ in range(rng.randint(1, 4))]
        return "POST", "/v1/reverse-attention", {"json": {"request_id": request_id, "cells": chosen}}
    if kind == "visual-relevance":
        return "GET", f"/v1/visual-relevance/{request_id}", {"params": {"threshold": rng.choice((0.5, 1.0, 2.0))}}
    if kind == "logit-lens":
        return "POST", "/v1/logit-lens", {"json": {"request_id": request_id, "k": rng.randint(1, 5)}}
    if kind == "analysis-tokens":
        token_set = rng.choice(TOKEN_SETS)
        width, height = layout.image_size
        selection = {
            "object": {"box": [0, 0, rng.uniform(1, width), rng.uniform(1, height)], "buffer": rng.randint(0, 2)},
            "register": {},
            "random": {"k": rng.randint(1, cells.size), "seed": rng.randrange(1000)},
            "top": {"k": rng.randint(1, cells.size), "method": rng.choice(TOP_METHODS)},
        }[token_set]
        return "POST", "/v1/analysis-tokens", {"json": {"request_id": request_id, "kind": token_set,
                                                        "token_index": token, **selection}}
    positions = sorted(rng.sample(cells.ravel().tolist(), rng.randint(1, min(16, cells.size))))
    if kind == "ablate":
        return "POST", "/v1/ablate", {"json": {"request_id": request_id, "positions": positions,
                                               "token_index": token, "replacement": rng.choice(REPLACEMENTS)}}
    if kind == "knockout":
        return "POST", "/v1/knockout", {"json": {"request_id": request_id, "positions": positions,
                                                 "token_index": token}}
    raise ValueError(f"unknown request kind {kind!r}")


def run_client(url: str, sessions: list[Session], kinds: tuple[str, ...], deadline: float, record: SoakRecord,
               rng: random.Random, timeout_s: float) -> None:
    """Until `deadline`: generate an answer about a random scene, then every other kind about it, shuffled."""
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        while time.monotonic() < deadline:
            response = send(client, record, "generate", "POST", "/v1/generate", deadline, rng,
                            **generate_request(rng.choice(sessions), rng))
            if response is None:
                time.sleep(1.0)  # a failed generate: not straight into the next one
                continue
            summary = response.json()
            for kind in rng.sample(kinds, len(kinds)):
                if time.monotonic() >= deadline:
                    return
                verb, path, request = follow_up(kind, summary, rng)
                send(client, record, kind, verb, path, deadline, rng, **request)


def latency_figures(requests: list[dict]) -> dict:
    """Per request kind answered: count, p50 / p95 / p99 and max latency in seconds."""
    figures = {}
    for kind in REQUEST_KINDS:
        latencies = [r["latency_s"] for r in requests if r["kind"] == kind and r["outcome"] == "ok"]
        if latencies:
            values = np.percentile(latencies, PERCENTILES)
            figures[kind] = {"count": len(latencies), **{f"p{p}_s": round(float(v), 3)
                                                          for p, v in zip(PERCENTILES, values)},
                             "max_s": round(max(latencies), 3)}
    return figures


def machine() -> dict:
    import torch

    uname = platform.uname()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), uname.machine)
    return {"system": f"{uname.system} {uname.release} {uname.machine}", "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}


def soak(minutes: float, clients: int, kinds: tuple[str, ...] = REQUEST_KINDS[1:], cache_mb: float = 8,
         concurrency: int | None = None, queue: int | None = None, sample_s: float = 2.0, seed: int = 0) -> dict:
    """Run the soak and return its figures (see write_report); `kinds`: the requests made about each answer."""
    limits = {**hosted_limits(), "cache_mb": cache_mb}
    service = hosted_service(MODEL, limits, device="cpu")
    service.model()
    concurrency = limits["concurrency"] if concurrency is None else concurrency
    queue = limits["queue"] if queue is None else queue
    admission = Admission(concurrency, queue)
    sessions = make_sessions(16)
    settings = {"model": MODEL, "minutes": minutes, "clients": clients, "kinds": list(kinds),
                "concurrency": concurrency, "queue": queue,
                "cache_mb": cache_mb, "time_limit_s": service.timeout_s, "max_upload_mb": limits["max_upload_mb"],
                "image_memory_mb": limits["image_memory_mb"], "rate_limit": None, "answer_tokens": ANSWER_TOKENS,
                "sample_s": sample_s, "seed": seed}
    before = process_figures()
    load_start = os.getloadavg()
    record = SoakRecord()
    stop = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(record, service, sample_s, stop), daemon=True)
    with BackgroundServer(service, admission=admission,
                          **hosted_bounds(limits, admission, rate_limited=False)) as backend:
        record.start = time.monotonic()
        sampler.start()
        deadline = record.start + 60 * minutes
        # a client waits at most the admission's wait and the time limit, plus slack for the answer itself
        timeout_s = admission.wait_s + service.timeout_s + 60
        workers = [threading.Thread(target=run_client, args=(backend.url, sessions, kinds, deadline, record,
                                                             random.Random(seed * 1000 + index), timeout_s))
                   for index in range(clients)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        wall_s = time.monotonic() - record.start
        stop.set()
        sampler.join()
    outcomes = [r["outcome"] for r in record.requests]
    rss = [s["rss_mb"] for s in record.samples]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(), "load_average_start": [round(v, 2) for v in load_start],
                    "load_average_end": [round(v, 2) for v in os.getloadavg()]},
        "settings": settings,
        "wall_s": round(wall_s, 1),
        "totals": {"answered": outcomes.count("ok"), "busy_refusals": outcomes.count("busy"),
                   "errors": outcomes.count("error")},
        "latency_s": latency_figures(record.requests),
        "errors": [{"kind": kind, "error": error, "count": count}
                   for (kind, error), count in sorted(record.errors.items())],
        "rss_mb": {"start": rss[0], "peak": max(rss), "end": rss[-1]},
        "cache": service.memory(),
        "process": {"before": before, "after": process_figures()},
        "samples": record.samples,
        "requests": record.requests,
    }


def markdown(figures: dict, command: str) -> str:
    settings, totals, machine_figures = figures["settings"], figures["totals"], figures["machine"]
    lines = [
        "# Soak test", "",
        f"Written by `{command}` on {figures['date']}: {settings['clients']} concurrent clients for "
        f"{settings['minutes']:g} minutes ({figures['wall_s']:g} s until the last answer) against the HTTP backend "
        f"on the `{settings['model']}` model, started in the same process. [rss.html](rss.html) plots RSS and "
        "latencies over time; soak.json holds the raw figures.", "",
        f"- Machine: {machine_figures['system']}, {machine_figures['cpu']}, {machine_figures['cores']} cores "
        f"(load average, every process on the machine: {machine_figures['load_average_start'][0]:g} at the start, "
        f"{machine_figures['load_average_end'][0]:g} at the end), torch {machine_figures['torch']} with "
        f"{machine_figures['torch_threads']} threads, Python {machine_figures['python']}.",
        f"- Bounds: concurrency {settings['concurrency']}, queue {settings['queue']}, cache "
        f"{settings['cache_mb']:g} MB, time limit {settings['time_limit_s']:g} s, uploads "
        f"{settings['max_upload_mb']:g} MB and images in flight {settings['image_memory_mb']:g} MB "
        "(configs/hosted.json, the cache smaller so that traces are evicted and regenerated); no rate limit.",
        f"- Each answer ({settings['answer_tokens']} tokens, a third sampled with a seed) is followed by, shuffled: "
        f"{', '.join(settings['kinds'])}.", "",
        "| answered | busy, retried (503 + Retry-After) | errors |", "|---:|---:|---:|",
        f"| {totals['answered']} | {totals['busy_refusals']} | {totals['errors']} |", "",
        "## Latency by request kind (seconds, answered requests, queueing included)", "",
        "| request | count | p50 | p95 | p99 | max |", "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {kind} | {row['count']} | {row['p50_s']:.3f} | {row['p95_s']:.3f} | {row['p99_s']:.3f} | "
              f"{row['max_s']:.3f} |" for kind, row in figures["latency_s"].items()]
    lines += ["", "## Errors", ""]
    if figures["errors"]:
        lines += ["| request | error | count |", "|---|---|---:|"]
        lines += [f"| {row['kind']} | {row['error'].replace('|', '/')} | {row['count']} |" for row in figures["errors"]]
    else:
        lines.append("None.")
    rss, samples = figures["rss_mb"], figures["samples"]
    lines += ["", "## Memory (RSS of the process: backend, model and clients)", "",
              f"{rss['start']:g} MB at the start, {rss['peak']:g} MB at the peak, {rss['end']:g} MB at the end "
              f"(sampled every {figures['settings']['sample_s']:g} s); the cache held "
              f"{figures['cache']['cache_bytes'] / 2 ** 20:.1f} MB of its {figures['cache']['cache_limit'] / 2 ** 20:g}"
              f" MB at the end; threads {figures['process']['before']['threads']} before and "
              f"{figures['process']['after']['threads']} after, open files {figures['process']['before']['open_files']}"
              f" before and {figures['process']['after']['open_files']} after.", "",
              "| minute | RSS (MB) | cache (MB) | threads |", "|---:|---:|---:|---:|"]
    marks = [60 * minute for minute in range(int(samples[-1]["t_s"] // 60) + 1)] + [samples[-1]["t_s"]]
    shown = []  # the sample nearest each whole minute, and the last one
    for mark in marks:
        sample = min(samples, key=lambda s: abs(s["t_s"] - mark))
        if sample not in shown:
            shown.append(sample)
    lines += [f"| {s['t_s'] / 60:.1f} | {s['rss_mb']:g} | {s['cache_mb']:g} | {s['threads']} |" for s in shown]
    return "\n".join(lines) + "\n"


def figure(figures: dict):
    """RSS and cache over time above, every answered request's latency by kind below."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    samples = figures["samples"]
    plot = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                         subplot_titles=("memory (MB)", "latency of answered requests (s)"))
    minutes = [s["t_s"] / 60 for s in samples]
    plot.add_trace(go.Scatter(x=minutes, y=[s["rss_mb"] for s in samples], name="RSS", mode="lines"), row=1, col=1)
    plot.add_trace(go.Scatter(x=minutes, y=[s["cache_mb"] for s in samples], name="cache", mode="lines"),
                   row=1, col=1)
    for kind in figures["latency_s"]:
        answered = [r for r in figures["requests"] if r["kind"] == kind and r["outcome"] == "ok"]
        plot.add_trace(go.Scatter(x=[r["t_s"] / 60 for r in answered], y=[r["latency_s"] for r in answered],
                                  name=kind, mode="markers", marker={"size": 5}), row=2, col=1)
    plot.update_yaxes(type="log", row=2, col=1)
    plot.update_xaxes(title_text="minutes", row=2, col=1)
    settings = figures["settings"]
    plot.update_layout(title=f"Soak: {settings['clients']} clients, {settings['minutes']:g} min, "
                             f"{figures['date']}", height=800)
    return plot


def write_report(figures: dict, out: Path, command: str) -> None:
    """out/README.md (tables), out/rss.html (figure, plotly.js from its CDN) and out/soak.json (raw figures)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(markdown(figures, command))
    figure(figures).write_html(out / "rss.html", include_plotlyjs="cdn")
    (out / "soak.json").write_text(json.dumps({"command": command, **figures}, indent=1))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True, help="folder for README.md, rss.html and soak.json")
    parser.add_argument("--kinds", default=",".join(REQUEST_KINDS[1:]),
                        help="the requests made about each answer, comma-separated (default: all)")
    parser.add_argument("--cache-mb", type=float, default=8, help="small, so that eviction and regeneration happen")
    parser.add_argument("--concurrency", type=int, default=None, help="default: configs/hosted.json's")
    parser.add_argument("--queue", type=int, default=None, help="default: configs/hosted.json's")
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--seed", type=int, default=0, help="of the clients' choices")
    args = parser.parse_args(argv)
    kinds = tuple(kind.strip() for kind in args.kinds.split(",") if kind.strip())
    unknown = sorted(set(kinds) - set(REQUEST_KINDS[1:]))
    if unknown or not kinds:
        parser.error(f"--kinds: unknown {', '.join(unknown) or 'empty list'}; choose from "
                     f"{', '.join(REQUEST_KINDS[1:])}")
    for name in ("minutes", "clients", "cache_mb", "sample_s"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be above 0, got {getattr(args, name):g}")
    if args.concurrency is not None and args.concurrency < 1:
        parser.error(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.queue is not None and args.queue < 0:
        parser.error(f"--queue must be 0 or more, got {args.queue}")
    figures = soak(args.minutes, args.clients, kinds, args.cache_mb, args.concurrency, args.queue, args.sample_s,
                   args.seed)
    command = shlex.join(["python", "-m", "lvlm_interpret.soak", *argv])
    write_report(figures, args.out, command)
    print(markdown(figures, command))
    return figures


if __name__ == "__main__":
    main()
