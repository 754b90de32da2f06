"""The HTTP backend and the remote client the web front end uses with --backend."""

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient

from components.attention_panel import render_attention
from lvlm_interpret import ExplainService, UserInputError
from lvlm_interpret.client import RemoteService
from lvlm_interpret.server import create_api
from tests.conftest import make_scene


@pytest.fixture(scope="module")
def service():
    return ExplainService(default_model="random:llava", device="cpu")


@pytest.fixture(scope="module")
def http(service):
    return TestClient(create_api(service))


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_generate_then_explain_over_http(http, service):
    response = http.post("/v1/generate", files={"image": ("s.png", _png(make_scene()), "image/png")},
                         data={"prompt": "Describe the image.", "max_new_tokens": "4"})
    assert response.status_code == 200
    summary = response.json()
    assert len(summary["answer_texts"]) == 4 and summary["images"][0]["rows"] == 8
    body = http.post("/v1/explain", json={"request_id": summary["request_id"], "method": "tam", "token_index": 1})
    assert body.status_code == 200
    local = service.explain(summary["request_id"], "tam", 1)
    np.testing.assert_allclose(np.asarray(body.json()["maps"]["tam"][0]), local.maps[0], rtol=1e-6)
    assert set(body.json()["maps"]) == {"tam", "tam_raw", "tam_cleaned"}


@pytest.mark.parametrize("case", ["not an image", "empty", "unknown method", "unknown request", "bad option",
                                  "token out of range", "empty prompt"])
def test_bad_requests_get_400_or_404_with_one_message(http, case):
    good = {"image": ("s.png", _png(make_scene()), "image/png")}
    if case in ("not an image", "empty", "empty prompt"):
        files = {"image": ("s.png", {"not an image": b"hello", "empty": b""}.get(case, _png(make_scene())),
                           "image/png")}
        response = http.post("/v1/generate", files=files,
                             data={"prompt": "   " if case == "empty prompt" else "hi", "max_new_tokens": "2"})
    else:
        request_id = http.post("/v1/generate", files=good, data={"prompt": "hi", "max_new_tokens": "2"}).json()[
            "request_id"]
        body = {"request_id": request_id, "method": "attention", "token_index": 0}
        body.update({"unknown method": {"method": "saliency"}, "unknown request": {"request_id": "nope"},
                     "bad option": {"options": {"colour": "red"}}, "token out of range": {"token_index": 9}}[case])
        response = http.post("/v1/explain", json=body)
    assert response.status_code == (404 if case == "unknown request" else 400)
    message = response.json()["error"]
    assert message and "\n" not in message and "Traceback" not in message and "/work" not in message


def test_schema_is_published(http):
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/generate", "/v1/explain", "/v1/methods", "/v1/health"} <= set(paths)


def test_remote_service_serves_the_web_panels(http, service):
    remote = RemoteService(client=http)
    image = make_scene()
    request_id, trace = remote.generate([image], "Describe the image.")
    assert trace.answer == service.trace(request_id).answer
    picture = render_attention(remote, request_id, image, 1, layer="1")
    assert np.array_equal(np.asarray(picture), np.asarray(render_attention(service, request_id, image, 1,
                                                                           layer="1")))
    relevancy = remote.explain(request_id, "relevancy", 0)
    assert set(relevancy.all_maps()) == {"relevancy", "relevancy_vit", "relevancy_all"}
    with pytest.raises(UserInputError, match="unknown method"):
        remote.explain(request_id, "saliency", 0)


def test_serve_command_and_remote_client(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "lvlm_interpret", "serve", "--model", "random:qwen2_vl",
                                "--port", str(port), "--device", "cpu"], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                remote = RemoteService(f"http://127.0.0.1:{port}")
                break
            except UserInputError:
                if process.poll() is not None or time.time() > deadline:
                    raise AssertionError(process.stdout.read().decode()[-2000:])
                time.sleep(0.5)
        assert remote.default_model == "random:qwen2_vl"
        request_id, trace = remote.generate([make_scene(200, 90)], "Describe the image.")
        explanation = remote.explain(request_id, "attention", 0)
        layout = trace.images[0]
        assert explanation.maps[0].shape == (layout.rows, layout.cols) and layout.cols > layout.rows
    finally:
        process.terminate()
        process.wait(timeout=30)
    # with the backend gone, the client says so in one line
    with pytest.raises(UserInputError, match="cannot be reached"):
        remote.explain(request_id, "attention", 0)


def test_exports_over_http_match_the_in_process_ones(http, service, tmp_path):
    import json

    remote = RemoteService(client=http)
    request_id, trace = remote.generate([make_scene()], "Describe the image.", options=None)
    local = service.export(request_id, 1, "request", tmp_path / "local")
    fetched = remote.export(request_id, 1, "request", tmp_path / "remote")
    assert [p.name for p in fetched] == ["result.json", "maps.npz"]
    assert json.loads(fetched[0].read_text())["cleann"].keys() == json.loads(local[0].read_text())["cleann"].keys()
    np.testing.assert_array_equal(np.load(fetched[1])["tam"], np.load(local[1])["tam"])
    assert len(remote.export(request_id, 1, "png", tmp_path / "png")) == 8
    chosen = remote.export(request_id, 1, "request", tmp_path / "head1", {"cleann": {"head": 1}})
    assert json.loads(chosen[0].read_text())["cleann"]["1"]["head"] == 1
    for options, message in [({"cleann": {"heads": 1}}, "cleann has no option 'heads'"),
                              ({"cleann": {"head": True}}, "option head must be"),
                              ({"nope": {}}, "unknown method 'nope'"), ({"cleann": 3}, "must map method names")]:
        with pytest.raises(UserInputError, match=message):
            remote.export(request_id, 1, "request", tmp_path / "bad", options)
    response = http.get(f"/v1/export/{request_id}/1/request", params={"options": "{not json"})
    assert response.status_code == 400 and "options must be JSON" in response.json()["error"]
    with pytest.raises(UserInputError, match="unknown kind 'zip': choose one of 'png', 'request' or 'report'"):
        remote.export(request_id, 1, "zip", tmp_path / "bad")
    with pytest.raises(UserInputError):  # a path in place of the kind never reaches the file system
        remote.export(request_id, 1, "../../etc", tmp_path / "bad")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    with pytest.raises(UserInputError, match="out of range"):
        remote.export(request_id, 99, "png", tmp_path / "bad")


def test_analyses_over_http_match_the_in_process_ones(http, service):
    remote = RemoteService(client=http)
    request_id, trace = remote.generate([make_scene()], "Describe the image.", options=None)
    lens, local_lens = remote.logit_lens(request_id, 3), service.logit_lens(request_id, 3)
    assert lens.layers == local_lens.layers and (lens.rows, lens.cols) == (local_lens.rows, local_lens.cols)
    np.testing.assert_array_equal(lens.token_ids, local_lens.token_ids)
    np.testing.assert_allclose(lens.probs, local_lens.probs, atol=1e-6)
    assert lens.cell(0, 1, 2)[0][0] == local_lens.cell(0, 1, 2)[0][0]
    selection = {"box": [40, 0, 120, 96], "buffer": 1}
    positions = remote.analysis_tokens(request_id, "object", 1, **selection)
    assert positions == service.analysis_tokens(request_id, "object", 1, **selection) and positions
    assert remote.analysis_tokens(request_id, "random", 0, k=5, seed=3) == service.analysis_tokens(
        request_id, "random", 0, k=5, seed=3)
    ablated, local = remote.ablate(request_id, positions, 1, "zero"), service.ablate(request_id, positions, 1, "zero")
    assert ablated == local
    knocked = remote.knockout(request_id, positions, 1, ["early", "late"])
    assert knocked == service.knockout(request_id, positions, 1, ["early", "late"])
    assert [w.window for w in knocked.windows] == ["early", "late"]


@pytest.mark.parametrize("path, body, message", [
    ("/v1/analysis-tokens", {"kind": "object", "mask": [[1]]}, "mask: Extra inputs are not permitted"),
    ("/v1/analysis-tokens", {"kind": "blob"}, "unknown kind 'blob': choose one of 'object', 'register'"),
    ("/v1/ablate", {"positions": [0], "replacement": "zero"}, "image-token positions"),
    ("/v1/ablate", {"positions": [40], "replacement": "noise"}, "unknown replacement"),
    ("/v1/knockout", {"positions": [40], "windows": ["sideways"]}, "sideways"),
    ("/v1/logit-lens", {"k": 0}, "k must be between"),
])
def test_bad_analysis_requests_get_one_message(http, path, body, message):
    request_id = http.post("/v1/generate", files={"image": ("s.png", _png(make_scene()), "image/png")},
                           data={"prompt": "hi", "max_new_tokens": "2"}).json()["request_id"]
    response = http.post(path, json={"request_id": request_id, **body})
    assert response.status_code == 400 and message in response.json()["error"]
