"""Security of the hosted mode: allowed models only, no checkpoint code, no pickle, no file outside the app's own,
capped uploads and answers, time limits, and no stack trace or server path in what a stranger sees."""

import json
import os
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from gradio_client import Client, handle_file

import lvlm_interpret.server as server_module
import lvlm_interpret.service as service_module
from app import launch
from lvlm_interpret import ExplainService, GenerationOptions, UserInputError, load_model
from lvlm_interpret.errors import ServiceBusyError
from lvlm_interpret.loadtest import free_port
from lvlm_interpret.server import create_api, serving_api
from lvlm_interpret.service import hosted_limits, hosted_service
from tests.conftest import make_scene
from tests.test_server import _png

ROOT = Path(__file__).resolve().parents[1]
LIMITS = hosted_limits()
# one file of each kind the app must never hand out: the system's, its own code, its config, its model weights
PRIVATE_FILES = {"/etc/passwd": b"root:", str(ROOT / "app.py"): b"def build_app",
                 str(ROOT / "configs" / "hosted.json"): b"max_upload_mb",
                 str(ROOT / "assets" / "demo-model" / "config.json"): b"model_type"}


def _traversals(path: str) -> list[str]:
    """Ways to write `path` in a URL: absolute, climbing out with ../ (plain and percent-encoded)."""
    climb = "../" * 12 + path.lstrip("/")
    return [path, climb, climb.replace("../", "%2e%2e%2f"), climb.replace("../", "..%2F"),
            "/tmp/gradio/" + climb]


@pytest.fixture(scope="module")
def loads(monkeypatch_module):
    """Names the service was asked to load while the test ran."""
    calls = []
    original = service_module.load_model
    monkeypatch_module.setattr(service_module, "load_model", lambda name, **kw: calls.append(name) or
                               original(name, **kw))
    return calls


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def hosted(loads):
    return hosted_service("any/hub-id-asked-for", LIMITS, device="cpu")


@pytest.fixture(scope="module")
def hosted_app(hosted):
    """The web app as `python app.py --hosted` serves it."""
    port = free_port()
    demo = launch(hosted, LIMITS, port=port, block=False)
    yield f"http://127.0.0.1:{port}"
    demo.close()


@pytest.fixture(scope="module")
def hosted_http(loads, monkeypatch_module):
    """The HTTP backend as `python -m lvlm_interpret serve --hosted` serves it, but for its rate limit (the probes
    below are hundreds of requests; tests/test_server_limits.py tests the limit)."""
    monkeypatch_module.setattr(server_module, "hosted_limits", lambda: {**LIMITS, "rate_limit_per_minute": 10 ** 6})
    return TestClient(serving_api("any/hub-id-asked-for", device="cpu", hosted=True))


def test_only_allowed_models_are_loaded(hosted, loads):
    assert hosted.default_model == LIMITS["models"][0] == "demo"
    for name in ("nobody/arbitrary-hub-model", "../../etc", "/tmp", "random:llava", str(ROOT / "assets")):
        with pytest.raises(UserInputError, match="not offered here; choose one of demo"):
            hosted.generate([make_scene()], "Describe the image.", model=name)
    assert set(loads) <= {"demo"}


def test_the_web_app_offers_only_allowed_models(hosted_app, loads):
    client = Client(hosted_app + "/", verbose=False, analytics_enabled=False)
    path = ROOT / "assets" / "examples" / "red-triangle.png"
    try:
        for name in ("nobody/arbitrary-hub-model", "random:llava", "../../etc"):
            with pytest.raises(Exception, match="not in the list of choices"):
                client.predict(handle_file(str(path)), "Describe the image.", name, 8, 0, 1, api_name="/on_generate")
        answer = client.predict(handle_file(str(path)), "What color is the triangle?", "demo", 8, 0, 1,
                                api_name="/on_generate")[0]
    finally:
        client.close()
    assert answer == "red"
    assert set(loads) <= {"demo"}


def test_the_http_backend_serves_only_its_model(hosted_http, loads):
    form = {"prompt": "What color is the circle?", "max_new_tokens": "4", "model": "nobody/arbitrary-hub-model"}
    response = hosted_http.post("/v1/generate", files={"image": ("s.png", _png(make_scene()), "image/png")},
                                data=form)
    assert response.status_code == 400 and "not offered here; choose one of demo" in response.json()["error"]
    form["model"] = "demo"
    response = hosted_http.post("/v1/generate", files={"image": ("s.png", _png(make_scene()), "image/png")},
                                data=form)
    assert response.status_code == 200 and response.json()["model"] == "demo"
    generate = hosted_http.get("/openapi.json").json()["paths"]["/v1/generate"]["post"]
    schema_ref = generate["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]
    fields = hosted_http.get("/openapi.json").json()["components"]["schemas"][schema_ref]["properties"]
    assert "demo" in str(fields["model"]) and "arbitrary" not in str(fields["model"])  # the schema lists the offer
    assert set(loads) <= {"demo"}


def test_checkpoint_code_never_runs_without_the_operator(tmp_path):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom_vlm", "auto_map": {"AutoConfig": "custom.Config",
                                                 "AutoModelForImageTextToText": "custom.Model"}}))
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(UserInputError, match="needs its own Python code .* --trust-remote-code"):
        load_model(str(folder), device="cpu")
    assert not marker.exists()
    assert "trust_remote_code" not in hosted_service("demo", LIMITS, device="cpu").load_options


def test_pickle_weights_are_never_loaded(tmp_path, llava):
    llava.model.save_pretrained(tmp_path)
    llava.processor.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(llava.model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UserInputError, match=r"no safetensors weights .* pickle weights \(.bin\) are never loaded"):
        load_model(str(tmp_path), device="cpu")


def test_no_file_outside_the_app_is_served_by_the_web_app(hosted_app):
    with httpx.Client(base_url=hosted_app, timeout=30) as http:
        # what the app itself hands out is served (an upload), so a refusal below means something
        uploaded = http.post("/gradio_api/upload", files={"files": ("s.png", _png(make_scene()), "image/png")})
        assert uploaded.status_code == 200
        assert http.get(f"/gradio_api/file={uploaded.json()[0]}").content == _png(make_scene())
        for path, canary in PRIVATE_FILES.items():
            for written in _traversals(path):
                for route in ("/gradio_api/file=", "/file=", "/gradio_api/static/", "/static/", "/assets/",
                              "/gradio_api/file/"):
                    response = http.get(route + written)
                    assert canary not in response.content, (route + written, response.status_code)


def test_no_file_outside_the_app_is_served_by_the_http_backend(hosted_http):
    request_id = hosted_http.post("/v1/generate", files={"image": ("s.png", _png(make_scene()), "image/png")},
                                  data={"prompt": "Describe the image.", "max_new_tokens": "3"}).json()["request_id"]
    for path, canary in PRIVATE_FILES.items():
        for written in _traversals(path):
            responses = [
                hosted_http.get(f"/v1/visual-relevance/{written}"),
                hosted_http.get(f"/v1/attention-overview/{written}/0"),
                hosted_http.get(f"/v1/export/{written}/0/png"),
                hosted_http.get(f"/v1/export/{request_id}/0/{written}"),
                hosted_http.post("/v1/explain", json={"request_id": written, "method": "attention", "token_index": 0}),
                hosted_http.post("/v1/explain", json={"request_id": request_id, "method": written, "token_index": 0}),
                hosted_http.post("/v1/reverse-attention", json={"request_id": written, "cells": [[0, 0]]}),
                hosted_http.get("/" + written),
            ]
            for response in responses:
                assert response.status_code in (400, 404), (response.url, response.status_code)
                assert canary not in response.content


def test_uploads_and_answers_are_capped(hosted_app, hosted_http):
    limit = int(LIMITS["max_upload_mb"] * 2 ** 20)
    too_big = os.urandom(limit + 2 ** 20)
    response = hosted_http.post("/v1/generate", files={"image": ("big.png", too_big, "image/png")},
                                data={"prompt": "Describe the image."})
    assert response.status_code == 413  # refused from its declared length, before it is received
    assert response.json()["error"] == f"the upload is larger than {LIMITS['max_upload_mb']} MB: upload a smaller file"
    just_over = hosted_http.post("/v1/generate", files={"image": ("big.png", too_big[:limit + 1], "image/png")},
                                 data={"prompt": "Describe the image."})
    assert just_over.status_code == 413
    assert f"larger than {LIMITS['max_upload_mb']} MB: upload a smaller file" in just_over.json()["error"]
    refused = httpx.post(hosted_app + "/gradio_api/upload", files={"files": ("big.png", too_big, "image/png")},
                         timeout=60)
    assert refused.status_code == 413
    longer = hosted_http.post("/v1/generate", files={"image": ("s.png", _png(make_scene()), "image/png")},
                              data={"prompt": "Hi.", "max_new_tokens": str(LIMITS["max_new_tokens"] + 1)})
    assert longer.status_code == 400
    assert longer.json()["error"] == f"answers are limited to {LIMITS['max_new_tokens']} new tokens here"


def test_a_request_over_its_time_limit_is_stopped(llava):
    service = ExplainService(default_model="random:llava", device="cpu", timeout_s=0.5)
    slow = llava.family.language_attentions(service.model().model)[1].register_forward_hook(
        lambda *args: time.sleep(0.1))
    try:
        started = time.monotonic()
        with pytest.raises(ServiceBusyError, match="took longer than 0.5 s and was stopped: ask for fewer new"):
            service.generate([make_scene()], "Describe the image.", options=GenerationOptions(32, min_new_tokens=32))
        assert time.monotonic() - started < 2  # stopped near its limit, not after 32 slow tokens
        response = TestClient(create_api(service)).post(
            "/v1/generate", files={"image": ("s.png", _png(make_scene()), "image/png")},
            data={"prompt": "Describe the image.", "max_new_tokens": "32"})
        assert response.status_code == 503 and "took longer than" in response.json()["error"]
    finally:
        slow.remove()
    request_id, trace = service.generate([make_scene()], "Describe the image.", options=GenerationOptions(3))
    assert trace.n_answer == 3  # the model serves the next request


def test_no_stack_trace_or_server_path_reaches_the_client(hosted, hosted_app, monkeypatch):
    secret = "/srv/secret/weights.bin"

    def broken(*args, **kwargs):
        raise RuntimeError(f"Traceback (most recent call last): cannot open {secret}")

    monkeypatch.setattr(hosted, "generate", broken)
    body = TestClient(create_api(hosted), raise_server_exceptions=False).post(
        "/v1/generate", files={"image": ("s.png", _png(make_scene()), "image/png")}, data={"prompt": "hi"})
    assert body.status_code == 500 and body.json() == {"error": "internal error (logged on the server); try again"}
    client = Client(hosted_app + "/", verbose=False, analytics_enabled=False)
    try:
        with pytest.raises(Exception) as shown:
            client.predict(handle_file(str(ROOT / "assets" / "examples" / "red-triangle.png")), "hi", "demo", 8, 0, 1,
                           api_name="/on_generate")
    finally:
        client.close()
    assert secret not in str(shown.value) and "Traceback" not in str(shown.value)
