"""Load on localhost: concurrent sessions against the HTTP backend and the web app each get their own answer and
maps, or a clean "busy, retry" when the queue is full; memory stays within the cache bound; nothing leaks."""

import pytest

from lvlm_interpret import ExplainService
from lvlm_interpret.loadtest import (
    BackgroundServer, Session, free_port, learn_expected, make_sessions, process_figures, run_load,
)
from lvlm_interpret.server import Admission

CACHE_BYTES = 2 * 2 ** 20  # a few traces: eviction and transparent recompute happen during the run


@pytest.fixture(scope="module")
def service():
    service = ExplainService(default_model="demo", device="cpu", cache_bytes=CACHE_BYTES)
    service.model()
    return service


@pytest.fixture(scope="module")
def backend_sessions(service):
    """Twelve sessions, each with the results it gets alone."""
    sessions = make_sessions(12)
    with BackgroundServer(service) as backend:
        learn_expected("backend", backend.url, sessions)
    return sessions


def test_backend_sessions_get_their_own_results_or_busy(service, backend_sessions):
    before = process_figures()
    with BackgroundServer(service, admission=Admission(concurrency=1, queue=2)) as backend:
        report = run_load("backend", backend.url, backend_sessions)
    assert report.errors == []
    assert report.requests == 12 * 3  # every generate and both explanations answered in the end
    assert report.refusals > 0  # 12 sessions against 3 places: some were told to retry (503 + Retry-After)
    memory = service.memory()
    assert 0 < memory["cache_bytes"] <= memory["cache_limit"] == CACHE_BYTES
    after = process_figures()
    assert after["threads"] <= before["threads"] and after["open_files"] <= before["open_files"]


def test_a_session_given_another_sessions_results_is_reported(service, backend_sessions):
    first, second = (Session(s.png, s.prompt, s.expected) for s in backend_sessions[:2])
    first.expected, second.expected = second.expected, first.expected
    with BackgroundServer(service) as backend:
        report = run_load("backend", backend.url, [first, second])
    assert len(report.errors) == 2 and "not its own" in report.errors[0]


def test_web_app_sessions_get_their_own_results_or_queue_full(service):
    from app import launch

    sessions = make_sessions(3)
    port = free_port()
    demo = launch(service, {}, port=port, concurrency=1, queue=1, block=False)
    try:
        report = run_load("app", f"http://127.0.0.1:{port}/", sessions)
    finally:
        demo.close()
    assert report.errors == []
    assert report.requests == 3 * 2
    assert report.refusals > 0  # "Queue is full", then served on retry
    assert service.memory()["cache_bytes"] <= CACHE_BYTES
