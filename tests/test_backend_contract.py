"""The page's handlers on both backends: in process (ExplainService) and over HTTP (RemoteService, as
`python app.py --backend URL` runs them). Every handler a user reaches (generate, token click, each method, the
attention controls, the gallery, the exports, the analyses, the trust panel) gives the same views on both."""

import json

import gradio as gr
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import build_app
from components import analysis_panel
from components.method_panel import method_names
from lvlm_interpret import ExplainBackend, ExplainService, TraceView
from lvlm_interpret.client import RemoteService
from lvlm_interpret.server import create_api
from tests.conftest import make_scene

NO_PROGRESS = lambda *args, **kwargs: None  # noqa: E731


@pytest.fixture(scope="module")
def backends():
    service = ExplainService(default_model="random:llava", device="cpu")
    remote = RemoteService(client=TestClient(create_api(service)))
    return {"in-process": service, "http": remote}


def _handlers(demo, name):
    return [f.fn for f in demo.fns.values() if f.name == name]


def _select(index):
    return gr.SelectData(None, {"index": index, "value": None, "selected": True})


def _pictures(outputs):
    """The arrays of every picture among a handler's outputs (gallery tiles included), in order."""
    found = []
    for value in outputs:
        if hasattr(value, "size") and hasattr(value, "mode"):
            found.append(np.asarray(value))
        elif isinstance(value, list) and value and isinstance(value[0], tuple):
            found += [np.asarray(tile) for tile, _ in value if hasattr(tile, "mode")]
        elif isinstance(value, list) and value and hasattr(value[0], "mode"):  # the gallery's captioned tiles
            found += [np.asarray(tile) for tile in value]
    return found


def _walk(page, service) -> dict:
    """Everything a user reaches in the page, on one backend: the pictures and texts each handler shows."""
    on_generate = _handlers(page, "on_generate")[0]  # the button (an example runs it too)
    on_select = _handlers(page, "on_select")[0]  # the answer strip; the linked views pin through it too
    on_method = _handlers(page, "on_method")[0]  # one handler, wired to each control
    on_controls = _handlers(page, "on_controls")[0]
    (on_image_click,) = _handlers(page, "on_image_click")
    shown = {}
    # CLEANN chosen before generating: the new answer's panels must all render with it (the reported fault)
    state, answer, *outputs = on_generate(make_scene(160, 96), "Describe the image.", "random:llava", 4, 0, 1,
                                          "cleann", None, "default", "all", True, progress=NO_PROGRESS)
    shown["generate"] = (answer, _pictures(outputs))
    state, *outputs = on_select(state, "all", "all", "mean", 0, "cleann", None, "default", "all", True, True,
                                _select(2))  # the gallery open
    shown["select"] = _pictures(outputs)
    for method in method_names():
        picture, *rest = on_method(state, method, None, "default", "1", True)
        shown[f"method {method}"] = (np.asarray(picture), rest[4])  # the picture and the summary line
    shown["controls"] = _pictures(on_controls(state, "1", "0", "max", 2, "default", "1", True))
    shown["reverse"] = on_image_click(state, "all", "all", "mean", _select((224, 134)))  # the figure's middle
    for on_export in _handlers(page, "on_export"):
        paths = on_export(state, "1", "0", "max", "0", "1", True)
        shown[f"export {sorted(p.rsplit('.', 1)[-1] for p in paths)}"] = sorted(
            p.rsplit("/", 1)[-1] for p in paths)
        for path in paths:
            if path.endswith("result.json"):
                record = json.loads(open(path).read())
                shown["result.json"] = (record["answer"], record["cleann"], record["method_options"])
                # the export follows the attention panel's layer, head and aggregation
                assert record["method_options"]["attention"] == {"layers": "1", "heads": "0", "aggregation": "max"}
    (on_trust,) = _handlers(page, "on_trust")
    verdict, rows, _ = on_trust(state, "0", "1", True, progress=NO_PROGRESS)
    shown["trust"] = (verdict, rows)
    selection = ("top k of a method", "", 0, 3, 0, "tam")
    shown["ablate"] = analysis_panel.run_ablation(service, state, "zero", *selection)[1]
    shown["knockout"] = analysis_panel.run_knockout(service, state, ["early"], *selection)[1]
    _, lens, _ = analysis_panel.on_new_request(service, state)
    shown["lens"] = np.asarray([trace.z for trace in lens.data if getattr(trace, "z", None) is not None],
                               dtype=np.float32)  # the HTTP body carries probabilities to 6 decimals
    return shown


def test_both_backends_implement_the_interface(backends):
    for backend in backends.values():
        assert isinstance(backend, ExplainBackend)
        request_id, trace = backend.generate([make_scene()], "Describe the image.")
        assert isinstance(trace, TraceView) and isinstance(backend.trace(request_id), TraceView)
        assert trace.source_position(0) == trace.prompt_length - 1


def test_every_page_handler_shows_the_same_on_both_backends(backends):
    walks = {name: _walk(build_app(backend), backend) for name, backend in backends.items()}
    local, remote = walks["in-process"], walks["http"]
    assert local.keys() == remote.keys()
    assert any(key.startswith("method cleann") for key in local)
    for key in local:
        a, b = local[key], remote[key]
        if key == "lens":
            assert a.size and a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-5)
        elif isinstance(a, tuple) and a and isinstance(a[0], np.ndarray):
            np.testing.assert_array_equal(a[0], b[0], err_msg=key)
            assert a[1:] == b[1:], key
        elif isinstance(a, list) and a and isinstance(a[0], np.ndarray):
            assert len(a) == len(b), key
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y, err_msg=key)
        elif isinstance(a, tuple) and len(a) == 2 and isinstance(a[1], list):
            assert a[0] == b[0], key
            for x, y in zip(a[1], b[1]):
                np.testing.assert_array_equal(x, y, err_msg=key)
        else:
            assert a == b, key


def test_the_page_on_a_backend_offers_only_the_backends_models(backends):
    remote = backends["http"]
    assert remote.allowed_models == ["random:llava"]
    page = build_app(remote)
    (dropdown,) = [block for block in page.blocks.values() if getattr(block, "elem_id", None) == "model"]
    assert [value for _, value in dropdown.choices] == ["random:llava"]
    on_generate = _handlers(page, "on_generate")[0]  # the button (an example runs it too)
    with pytest.raises(gr.Error, match="'random:qwen2_vl' is not offered by the backend; choose one of random:llava"):
        on_generate(make_scene(), "Describe the image.", "random:qwen2_vl", 4, 0, 1, progress=NO_PROGRESS)
    over_http = remote._client.post("/v1/generate", files={"image": ("s.png", b"x", "image/png")},
                                    data={"prompt": "Describe the image.", "model": "/etc"})
    assert over_http.status_code == 400 and "not offered here" in over_http.json()["error"]


def test_the_hosted_page_limits_each_client_address(backends):
    from types import SimpleNamespace

    from lvlm_interpret.ratelimit import RateLimiter

    page = build_app(backends["in-process"], RateLimiter(2))
    on_generate = _handlers(page, "on_generate")[0]  # the button (an example runs it too)

    def generate(address):
        client = SimpleNamespace(client=SimpleNamespace(host=address))
        return on_generate(make_scene(), "Describe the image.", "random:llava", 2, 0, 1, progress=NO_PROGRESS,
                           request=client)

    generate("10.0.0.1")
    generate("10.0.0.1")
    with pytest.raises(gr.Error, match="[Tt]oo many requests"):
        generate("10.0.0.1")
    assert generate("10.0.0.2")[1]  # another address is served
