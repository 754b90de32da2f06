"""Faults: out of memory mid-generation, a backend restart under an open front end, evicted requests. Each gives
one clear message and the next request is served."""

import contextlib

import gradio as gr
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app import build_app
from lvlm_interpret import ExplainService, GenerationOptions
from lvlm_interpret.client import RemoteService
from lvlm_interpret.errors import ServiceBusyError, UnknownRequestError
from lvlm_interpret.loadtest import BackgroundServer, free_port
from lvlm_interpret.server import create_api
from tests.conftest import make_scene
from tests.test_server import _png


@pytest.fixture(scope="module")
def service():
    return ExplainService(default_model="random:llava", device="cpu")


def _handler(demo, name):
    """The web page's handler `name`, as Gradio calls it."""
    return next(f.fn for f in demo.fns.values() if f.name == name)


@contextlib.contextmanager
def out_of_memory_once(service, at_forward: int = 3):
    """The model runs out of memory once, in its `at_forward`-th decoder forward (mid-generation)."""
    loaded = service.model()
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == at_forward:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (/opt/secret/path)")

    handle = loaded.family.language_attentions(loaded.model)[0].register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def test_out_of_memory_is_one_message_and_the_next_request_is_served(service):
    options = GenerationOptions(max_new_tokens=6, min_new_tokens=6)
    with out_of_memory_once(service) as calls:
        with pytest.raises(ServiceBusyError, match="out of memory: try a smaller image or fewer new tokens"):
            service.generate([make_scene()], "Describe the image.", options=options)
        assert len(calls) == 3  # it failed mid-generation, after the prompt and one answer token
        request_id, trace = service.generate([make_scene()], "Describe the image.", options=options)
    assert trace.n_answer == 6
    assert service.explain(request_id, "tam", 5).maps[0].shape == (8, 8)


def test_out_of_memory_over_http_is_503_with_retry_after(service):
    http = TestClient(create_api(service))
    form = {"files": {"image": ("s.png", _png(make_scene()), "image/png")},
            "data": {"prompt": "Describe the image.", "max_new_tokens": "4"}}
    with out_of_memory_once(service):
        refused = http.post("/v1/generate", **form)
        served = http.post("/v1/generate", **form)
    assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
    assert refused.json()["error"].startswith("out of memory")
    assert "secret" not in refused.text and "Traceback" not in refused.text
    assert served.status_code == 200


def test_out_of_memory_in_the_web_app_is_a_notice(service):
    on_generate = _handler(build_app(service), "on_generate")
    with out_of_memory_once(service), pytest.raises(gr.Error, match="out of memory") as notice:
        on_generate(make_scene(), "Describe the image.", "random:llava", 4, 0, 1, progress=lambda *a, **k: None)
    assert "secret" not in str(notice.value)
    state, answer, *_ = on_generate(make_scene(), "Describe the image.", "random:llava", 4, 0, 1,
                                    progress=lambda *a, **k: None)
    assert answer == service.trace(state["request_id"]).answer


def test_backend_restart_under_an_open_front_end(service):
    port = free_port()
    image = make_scene()
    with BackgroundServer(service, port=port) as backend:
        remote = RemoteService(backend.url)
        page = build_app(remote)  # the web app as `python app.py --backend URL` runs it
        state, answer, *_ = _handler(page, "on_generate")(image, "Describe the image.", "random:llava", 4, 0, 1,
                                                         progress=lambda *a, **k: None)
        before = _handler(page, "on_method")(state, "tam", None, None, None, None)[0]
    with pytest.raises(gr.Error, match="cannot be reached .* retry in a moment"):
        _handler(page, "on_method")(state, "relevancy", None, None, None, None)
    # a restarted backend has a fresh service that knows none of the old request ids: the front end regenerates
    with BackgroundServer(ExplainService(default_model="random:llava", device="cpu"), port=port):
        np.testing.assert_array_equal(np.asarray(_handler(page, "on_method")(state, "tam", None, None, None, None)[0]),
                                      np.asarray(before))
        assert remote.visual_relevance(state["request_id"]).llr is not None
        assert remote.trace(state["request_id"]).answer == answer
    # restarted with another model, the old answer cannot be reproduced: the front end says so
    with BackgroundServer(ExplainService(default_model="random:qwen2_vl", device="cpu"), port=port):
        with pytest.raises(gr.Error, match="restarted and no longer takes this request .* generate again"):
            _handler(page, "on_method")(state, "tam", None, None, None, None)
        assert remote.generate([image], "Describe the image.")[1].model_name == "random:qwen2_vl"


def test_evicted_request_is_recomputed_or_named_expired():
    # room for one trace: generating a second evicts the first one's trace, and then its inputs too
    service = ExplainService(default_model="random:llava", device="cpu", cache_bytes=1, requests_bytes=1)
    http = TestClient(create_api(service))
    first, _ = service.generate([make_scene()], "Describe the image.", options=GenerationOptions(max_new_tokens=3))
    expected = service.explain(first, "attention", 0).maps[0]
    service._cache.put("filler", object(), 10)  # the first trace and its maps are evicted between two clicks
    np.testing.assert_array_equal(service.explain(first, "attention", 0).maps[0], expected)
    service.generate([make_scene(120, 120)], "Describe the image.", options=GenerationOptions(max_new_tokens=3))
    with pytest.raises(UnknownRequestError, match="unknown or expired request: generate an answer first"):
        service.explain(first, "attention", 0)
    response = http.post("/v1/explain", json={"request_id": first, "method": "attention", "token_index": 0})
    assert response.status_code == 404 and response.json()["error"].startswith("unknown or expired request")
