"""Load test on localhost: many concurrent sessions against the HTTP backend and the web app.

`python -m lvlm_interpret.loadtest --model demo --sessions 32 --rounds 2` starts the backend in this process
(bounded concurrency and queue, a cache bound); `--targets backend,app --page-url URL` also loads a page started
apart (`python app.py`). It runs every session once alone to learn its answer and maps, then all at
once, and prints sessions, requests, "busy, retry" refusals, errors, p50 / p95 latency, peak memory, the cache
against its bound and the threads and open files before and after. A session that sees anything but its own
answer and maps counts as an error. Sessions honour Retry-After (capped) and retry a refused request.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the web app's client must not phone home

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from .demo.scenes import HELD_OUT_SEED_START, color_prompt, draw_scene, exists_prompt  # noqa: E402
from .server import Admission, create_api  # noqa: E402
from .service import ExplainService  # noqa: E402




@dataclass
class Session:
    """One user's inputs; `expected` is what they got alone (answer and maps), filled in by the first pass."""

    png: bytes
    prompt: str
    expected: tuple | None = None


@dataclass
class LoadReport:
    target: str
    sessions: int
    requests: int = 0  # answered
    refusals: int = 0  # "busy, retry" answers, each retried
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def answered(self, seconds: float) -> None:
        with self.lock:
            self.requests += 1
            self.latencies_s.append(seconds)

    def figures(self) -> dict:
        ordered = sorted(self.latencies_s) or [float("nan")]
        return {"target": self.target, "sessions": self.sessions, "requests": self.requests,
                "refusals": self.refusals, "errors": len(self.errors), "error_kinds": sorted(set(self.errors))[:5],
                "wall_s": round(self.wall_s, 2),
                "p50_s": round(statistics.median(ordered), 3),
                "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3)}


def make_sessions(count: int, size: int = 96) -> list[Session]:
    """Distinct held-out demo scenes, each with one of three questions about its first object."""
    sessions = []
    for index in range(count):
        scene = draw_scene(HELD_OUT_SEED_START + 7919 * index, size)
        buffer = io.BytesIO()
        scene.image.save(buffer, format="PNG")
        first = scene.objects[0]
        prompts = ("Describe the image.", color_prompt(first.shape), exists_prompt(first.colour, first.shape))
        sessions.append(Session(buffer.getvalue(), prompts[index % 3]))
    return sessions


def _same(left: tuple, right: tuple) -> bool:
    return left[0] == right[0] and all(np.allclose(a, b, atol=1e-5) for a, b in zip(left[1:], right[1:]))


class BusyRefusal(Exception):
    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _with_retries(report: LoadReport, call, give_up_s: float, max_wait_s: float):
    """`call()` timed; a "busy, retry" refusal is counted, waited out (Retry-After, capped, jittered so that
    waiting sessions spread out) and retried, for at most `give_up_s`."""
    give_up = time.monotonic() + give_up_s
    while time.monotonic() < give_up:
        start = time.perf_counter()
        try:
            result = call()
        except BusyRefusal as refusal:
            with report.lock:
                report.refusals += 1
            time.sleep(min(refusal.retry_after_s, max_wait_s) * random.uniform(0.5, 1.5))
            continue
        report.answered(time.perf_counter() - start)
        return result
    raise RuntimeError(f"still refused after {give_up_s:g} s of retries")


def backend_session(url: str, session: Session, rounds: int, report: LoadReport, give_up_s: float = 300,
                    max_wait_s: float = 0.2) -> tuple:
    """Generate, then explain the first token (attention) and the last one (TAM), `rounds` times over HTTP."""
    def post(client, path, **kwargs):
        response = client.post(path, **kwargs)
        if response.status_code == 503:
            message = response.json()["error"]
            if "retry" not in message or "Retry-After" not in response.headers:
                raise RuntimeError(f"a 503 without 'retry' and Retry-After: {message}")
            raise BusyRefusal(message, float(response.headers["Retry-After"]))
        if response.status_code != 200:
            raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")
        return response.json()

    fingerprint = None
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(rounds):
            summary = _with_retries(report, lambda: post(client, "/v1/generate", files={
                "image": ("scene.png", session.png, "image/png")}, data={"prompt": session.prompt,
                                                                          "max_new_tokens": "8"}),
                                    give_up_s, max_wait_s)
            maps = []
            for method, token in (("attention", 0), ("tam", len(summary["answer_ids"]) - 1)):
                body = _with_retries(report, lambda: post(client, "/v1/explain", json={
                    "request_id": summary["request_id"], "method": method, "token_index": token}),
                    give_up_s, max_wait_s)
                maps.append(np.asarray(body["maps"][method], dtype=np.float32))
            current = (summary["answer"], *maps)
            if fingerprint is not None and not _same(fingerprint, current):
                raise RuntimeError("the same inputs gave another answer or maps within one session")
            fingerprint = current
    return fingerprint


def app_session(url: str, session: Session, rounds: int, report: LoadReport, give_up_s: float = 300,
                max_wait_s: float = 0.2) -> tuple:
    """Through the web app's own API (gradio_client): generate, then switch the method panel to TAM."""
    import tempfile

    from gradio_client import Client, handle_file

    def predict(client, *args, api_name):
        try:
            return client.predict(*args, api_name=api_name)
        except Exception as error:  # gradio_client raises its own types; a full queue is refused with this text
            if "Queue is full" in str(error):
                raise BusyRefusal(str(error), 1.0) from None
            raise RuntimeError(f"{api_name}: {error}") from None

    fingerprint = None
    with tempfile.TemporaryDirectory(prefix="lvlm-loadtest-") as folder:
        path = os.path.join(folder, "scene.png")
        with open(path, "wb") as file:
            file.write(session.png)
        client = Client(url, verbose=False, download_files=folder, analytics_enabled=False)
        try:
            for _ in range(rounds):
                generated = _with_retries(report, lambda: predict(
                    client, handle_file(path), session.prompt, None, 8, 0, 1, api_name="/on_generate"),
                    give_up_s, max_wait_s)
                method = _with_retries(report, lambda: predict(client, "tam", None, api_name="/on_method"),
                                       give_up_s, max_wait_s)
                current = (generated[0], *(np.asarray(Image.open(p)) for p in (generated[4], method[0])))
                if fingerprint is not None and not _same(fingerprint, current):
                    raise RuntimeError("the same inputs gave another answer or maps within one session")
                fingerprint = current
        finally:
            client.close()
            client.executor.shutdown()  # close() stops only the heartbeat; the request threads would linger
    return fingerprint


SESSIONS = {"backend": backend_session, "app": app_session}


def learn_expected(target: str, url: str, sessions: list[Session]) -> None:
    """Run every session whose results are not known yet once, alone: what it should get under load too."""
    for session in sessions:
        if session.expected is None:
            session.expected = SESSIONS[target](url, session, 1, LoadReport(target, 1))


def run_load(target: str, url: str, sessions: list[Session], rounds: int = 1,
             max_wait_s: float = 0.2) -> LoadReport:
    """All sessions at the same time, after learning what each should get."""
    learn_expected(target, url, sessions)
    run_session = SESSIONS[target]
    report = LoadReport(target, len(sessions))

    def one(session: Session) -> None:
        try:
            got = run_session(url, session, rounds, report, max_wait_s=max_wait_s)
            if not _same(got, session.expected):
                raise RuntimeError("a session got an answer or maps that are not its own")
        except Exception as error:  # every failure is a finding of the load test
            with report.lock:
                report.errors.append(str(error).splitlines()[0][:300])

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(sessions)) as pool:
        list(pool.map(one, sessions))
    report.wall_s = time.perf_counter() - start
    return report


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class BackgroundServer:
    """The HTTP backend served by uvicorn in a thread of this process (start / stop, e.g. to simulate a
    restart)."""

    def __init__(self, service: ExplainService, port: int | None = None, **api_options):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(create_api(service, **api_options), host="127.0.0.1",
                                                     port=self.port, log_level="error"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the backend did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def process_figures() -> dict:
    """Peak resident memory of this process, its threads and open files now."""
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "threads": threading.active_count(), "open_files": len(os.listdir("/proc/self/fd"))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="generate + two explanations, per session")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--queue", type=int, default=8, help="waiting requests beyond which the busy are refused")
    parser.add_argument("--cache-mb", type=float, default=4, help="small, so that eviction and recompute happen")
    parser.add_argument("--targets", default="backend", help="backend, app or backend,app")
    parser.add_argument("--page-url", default=None, help="the app target: a page started apart, e.g. `python "
                                                         "app.py --model demo` at http://127.0.0.1:7860/")
    parser.add_argument("--max-wait-s", type=float, default=1.0, help="cap of a refused session's wait")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    targets = args.targets.split(",")
    if not set(targets) <= {"backend", "app"}:
        parser.error(f"--targets lists backend and/or app, got {args.targets!r}")
    if "app" in targets and not args.page_url:
        parser.error("--targets app needs --page-url of a running page (start one with `python app.py`)")
    sessions = make_sessions(args.sessions)
    results = {"model": args.model, "rounds": args.rounds, "before": process_figures()}
    if "backend" in targets:
        service = ExplainService(default_model=args.model, device="cpu", cache_bytes=int(args.cache_mb * 2 ** 20))
        service.model()
        with BackgroundServer(service, admission=Admission(args.concurrency, args.queue)) as backend:
            results["backend"] = run_load("backend", backend.url, sessions, args.rounds, args.max_wait_s).figures()
        results["backend"]["memory"] = service.memory()
        results["after_backend"] = process_figures()
    if "app" in targets:
        fresh = [Session(s.png, s.prompt) for s in sessions]  # the app's maps are pictures
        results["app"] = run_load("app", args.page_url, fresh, args.rounds, args.max_wait_s).figures()
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main()
