"""Share links: an opaque id that reopens a request (its answer, maps and inputs) from any session and either
backend, served from the cache or regenerated once evicted, kept in a bounded store and, in hosted mode, for a
configured lifetime; an unknown or expired link is one line."""

import re

import numpy as np
import pytest
from fastapi.testclient import TestClient

from lvlm_interpret import ExplainService, GenerationOptions
from lvlm_interpret.errors import UnknownRequestError
from lvlm_interpret.client import RemoteService
from lvlm_interpret.server import create_api
from lvlm_interpret.service import Request, hosted_limits, hosted_service, request_nbytes
from tests.conftest import make_scene

PROMPT = "Describe the image."
OPTIONS = GenerationOptions(max_new_tokens=6)


def _service(**bounds) -> ExplainService:
    return ExplainService(default_model="random:llava", device="cpu", **bounds)


@pytest.fixture(scope="module")
def service():
    return _service()


@pytest.fixture(scope="module")
def backends(service):
    return {"in-process": service, "http": RemoteService(client=TestClient(create_api(service)))}


@pytest.mark.parametrize("name", ["in-process", "http"])
def test_a_link_is_opaque_and_reopens_the_same_request(backends, name):
    backend = backends[name]
    image = make_scene(150, 90)
    request_id, trace = backend.generate([image], PROMPT, options=OPTIONS)
    expected = backend.explain(request_id, "relevancy", 1).maps[0]
    link = backend.share(request_id)
    # the id says nothing of the request: not its prompt, its request id or its answer
    assert re.fullmatch(r"[A-Za-z0-9_-]{32}", link.share_id)
    assert request_id not in link.share_id and link.expires_at is None  # no lifetime outside hosted mode
    assert backend.share(request_id).share_id != link.share_id
    shared = backend.open_shared(link.share_id)
    assert shared.trace.answer == trace.answer and list(shared.trace.answer_ids) == list(trace.answer_ids)
    assert shared.trace.prompt == PROMPT and shared.options.max_new_tokens == OPTIONS.max_new_tokens
    np.testing.assert_array_equal(np.asarray(shared.images[0]), np.asarray(image))
    np.testing.assert_array_equal(backend.explain(shared.request_id, "relevancy", 1).maps[0], expected)


def test_an_evicted_request_comes_back_identical_from_another_front_end():
    # caches that hold one request each: the next generation evicts the shared one's trace, maps and inputs
    service = _service(cache_bytes=1, requests_bytes=1)
    for name, backend in {"in-process": service, "http": RemoteService(client=TestClient(create_api(service)))
                          }.items():
        request_id, trace = backend.generate([make_scene()], PROMPT, options=OPTIONS)
        maps = {method: backend.explain(request_id, method, 2).maps[0] for method in ("attention", "tam")}
        link = backend.share(request_id)
        backend.generate([make_scene(120, 120)], "What is red?", options=OPTIONS)
        with pytest.raises(UnknownRequestError):
            service.request(request_id)  # the request itself is forgotten
        other = backend if name == "in-process" else RemoteService(client=backend._client)
        shared = other.open_shared(link.share_id)
        assert shared.trace.answer == trace.answer, name
        for method, expected in maps.items():
            np.testing.assert_array_equal(other.explain(shared.request_id, method, 2).maps[0], expected,
                                          err_msg=f"{name} {method}")


def test_the_store_of_links_is_bounded():
    one_request = request_nbytes(Request("random:llava", (make_scene(),), PROMPT, OPTIONS))
    service = _service(shares_bytes=int(2.5 * one_request))
    links = []
    for number in range(4):  # four requests of the same size, room for two links
        request_id, _ = service.generate([make_scene()], f"Describe image {number}.", options=OPTIONS)
        links.append(service.share(request_id))
    memory = service.memory()
    assert 0 < memory["shares_bytes"] <= memory["shares_limit"]
    with pytest.raises(UnknownRequestError, match="unknown shared link: .* bounded number of links"):
        service.open_shared(links[0].share_id)  # the least recently made or opened went first
    assert service.open_shared(links[-1].share_id).trace.prompt == "Describe image 3."


def test_links_expire_after_their_lifetime_in_hosted_mode():
    assert hosted_service("demo", hosted_limits()).share_lifetime_s == hosted_limits()["share_link_hours"] * 3600
    service = _service(share_lifetime_s=2 * 3600)
    now = [1_800_000_000.0]  # 2027-01-15 08:00 UTC
    service.clock = lambda: now[0]
    remote = RemoteService(client=TestClient(create_api(service)))
    from components.share_panel import on_share
    request_id, _ = remote.generate([make_scene()], PROMPT, options=OPTIONS)
    _, link = on_share(remote, {"request_id": request_id, "token": 0}, {}, "attention", "tam", None, "all", "all", "mean")
    assert link["label"].endswith("valid until 2027-01-15 10:00 UTC")  # the page says how long the link lives
    for backend in (service, remote):
        request_id, _ = backend.generate([make_scene()], PROMPT, options=OPTIONS)
        link = backend.share(request_id)
        assert link.expires_at == now[0] + 2 * 3600
        now[0] += 2 * 3600 - 1
        assert backend.open_shared(link.share_id).trace.prompt == PROMPT
        now[0] += 2
        for _ in range(2):  # still said once its inputs are dropped
            with pytest.raises(UnknownRequestError, match=r"^this shared link expired on 2027-01-15 10:00 UTC "
                                                          r"\(links here last 2 h\): ask whoever sent it for a new"):
                backend.open_shared(link.share_id)
        now[0] -= 2 * 3600 + 1
    expired = remote._client.get(f"/v1/share/{link.share_id}")
    assert expired.status_code == 404 and expired.json()["error"].startswith("this shared link expired")


@pytest.mark.parametrize("name", ["in-process", "http"])
def test_an_unknown_or_malformed_link_is_one_line(backends, name):
    for share_id in ["", "abc", "A" * 32, "../../etc/passwd", "é" * 20, "x" * 65, "a/b" * 8]:
        with pytest.raises(UnknownRequestError, match="^unknown shared link: it was not made here, or was "
                                                      "forgotten .* ask whoever sent it for a new link$"):
            backends[name].open_shared(share_id)


def test_the_http_endpoints_answer_unknown_links_in_one_line_and_are_in_the_schema(backends):
    client = backends["http"]._client
    for path in ("/v1/share/" + "A" * 32, "/v1/share/" + "A" * 32 + "/image"):
        answer = client.get(path)
        assert answer.status_code == 404 and answer.json()["error"].startswith("unknown shared link")
    unknown_request = client.post("/v1/share", json={"request_id": "nobody"})
    assert unknown_request.status_code == 404 and "unknown or expired request" in unknown_request.json()["error"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"404"} <= set(paths["/v1/share"]["post"]["responses"])
    assert {"200", "404", "503"} <= set(paths["/v1/share/{share_id}"]["get"]["responses"])
    assert "image/png" in paths["/v1/share/{share_id}/image"]["get"]["responses"]["200"]["content"]


# --- the page: Share makes a link; a page loaded with it shows the same request, word, tab, method and maps ---------
NO_PROGRESS = lambda *args, **kwargs: None  # noqa: E731


def _handler(page, name):
    return [f.fn for f in page.fns.values() if f.name == name][0]  # Generate: the button's (an example runs it too)


def _pictures(outputs) -> list[np.ndarray]:
    return [np.asarray(value) for value in outputs if hasattr(value, "mode")]


def _loaded_with(query: str):
    """What the page reads from its address `query` when it loads."""
    from types import SimpleNamespace
    from urllib.parse import parse_qsl

    from components.share_panel import read_url
    return read_url(SimpleNamespace(query_params=dict(parse_qsl(query.lstrip("?")))))


@pytest.mark.parametrize("name", ["in-process", "http"])
def test_a_shared_link_opens_the_page_at_the_same_view(backends, name):
    import gradio as gr

    from app import build_app

    backend = backends[name]
    page = build_app(backend)
    image = make_scene(160, 96)
    state, answer, *_ = _handler(page, "on_generate")(image, PROMPT, "random:llava", 6, 0, 1, progress=NO_PROGRESS)
    _, unpicked = _handler(page, "on_share_clicked")(state, {}, "attention", "tam", "tam", "all", "all", "mean")
    assert "token=" not in unpicked["value"]  # no word picked yet: the link opens on the answer as a whole
    # the sharer looks at word 2, layer 1 with max over heads, in the methods tab with TAM's raw map
    event = gr.SelectData(None, {"index": 2, "value": None, "selected": True})
    state, strip, *views = _handler(page, "on_select")(state, "1", "all", "max", 0, "tam", "tam_raw", "default", "all",
                                                       True, False, event)
    made, link = _handler(page, "on_share_clicked")(state, {}, "methods", "tam", "tam_raw", "1", "all", "max")
    query = link["value"]
    assert query.startswith("?share=") and PROMPT.split()[0] not in query and state["request_id"] not in query
    again, _ = _handler(page, "on_share_clicked")(state, made, "trust", "tam", "tam", "all", "all", "mean")
    assert again["share_id"] == made["share_id"]  # one link id per request, whatever the view

    # a colleague's fresh page, loaded with the link
    opened = _handler(build_app(backend), "on_open_link")(_loaded_with(query))
    opened_state, opened_answer, layer, head, opened_strip, *rest = opened
    assert opened_answer == answer and opened_state["token"] == 2 and opened_strip == strip
    assert (layer.value, head.value) == ("1", "all")
    shown = rest[:len(views)]
    assert len(_pictures(views)) == 3  # the attention map, the layer x head overview and the method's map
    for expected, got in zip(_pictures(views), _pictures(shown)):
        np.testing.assert_array_equal(got, expected)
    assert shown[4].value == views[4].value == "tam_raw"  # the map dropdown
    image_file, prompt, model, max_new_tokens, temperature, top_p = rest[len(views):len(views) + 6]
    from PIL import Image
    np.testing.assert_array_equal(np.asarray(Image.open(image_file).convert("RGB")), np.asarray(image))
    assert (prompt, model, max_new_tokens, temperature, top_p) == (PROMPT, "random:llava", 6, 0, 1.0)
    method, aggregation, gallery_open, tabs, tab = rest[len(views) + 6:]
    assert (method, aggregation, gallery_open, tabs.selected, tab) == ("tam", "max", False, "methods", "methods")
    # every tab of the page can be named, Compare and Features included
    from components.share_panel import TABS

    assert {"compare", "features"} <= set(TABS) <= {block.id for block in page.blocks.values()
                                                    if isinstance(block, gr.Tab)}
    _, features_link = _handler(page, "on_share_clicked")(state, made, "features", "tam", "tam", "all", "all", "mean")
    *_, tabs, tab = _handler(build_app(backend), "on_open_link")(_loaded_with(features_link["value"]))
    assert tabs.selected == tab == "features"


def test_an_expired_or_edited_link_is_one_message_that_stays_in_the_page(backends):
    import gradio as gr

    from app import build_app

    page = build_app(backends["in-process"])
    open_link = _handler(page, "on_open_link")
    with pytest.raises(gr.Error, match="unknown shared link") as raised:
        open_link(_loaded_with("?share=" + "A" * 32 + "&token=1"))
    assert raised.value.duration is None  # stays until closed: the page was opened for this link
    request_id, trace = backends["in-process"].generate([make_scene()], PROMPT, options=OPTIONS)
    share_id = backends["in-process"].share(request_id).share_id
    with pytest.raises(gr.Error, match=f"names word \\(token\\) '99', which this request does not have \\(0 to "
                                       f"{trace.n_answer - 1}\\)"):
        open_link(_loaded_with(f"?share={share_id}&token=99"))
    with pytest.raises(gr.Error, match="names method 'nothing'"):
        open_link(_loaded_with(f"?share={share_id}&method=nothing"))
    with pytest.raises(gr.Error, match="names tab '&lt;img src=x onerror=alert\\(1\\)&gt;'"):  # shown as text
        open_link(_loaded_with(f"?share={share_id}&tab=<img src=x onerror=alert(1)>"))
