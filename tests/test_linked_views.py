"""The linked views drawn in the browser: the payload carries every token's library maps at 8 bits (in process and
over HTTP), the page's own route answers a pinned token's costly map (the library's, one message per refusal, under
the hosted rate limit), and in Chromium hovering a token shows its maps with no round trip, a click pins it at once
(a costly map fetched from that route and kept), the answer strip pins the same token, and a brushed region lists
every word's mean value there; in both modes."""

import base64
import contextlib
import io
import os

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app import launch
from components.generation import run_generation
from components.linked_views import COSTLY_ROUTE, costly_maps, costly_methods, dequantize, payload, quantize
from components.method_panel import render_method
from lvlm_interpret import METHODS, ExplainService, UserInputError
from lvlm_interpret.client import RemoteService
from lvlm_interpret.errors import UnknownRequestError
from lvlm_interpret.loadtest import free_port
from lvlm_interpret.server import create_api
from lvlm_interpret.service import hosted_limits
from tests.conftest import make_scene
from tests import test_browser
from tests.test_browser import ARTIFACTS, CHROMIUM, FLAGS, _generate, _shown_image

app_url, backend_app_url = test_browser.app_url, test_browser.backend_app_url  # the pages' fixtures, shared


@pytest.fixture(scope="module")
def service():
    return ExplainService(default_model="random:llava", device="cpu")


def _views(record: dict) -> dict:
    """{view name: (uint8 [tokens, rows, cols], low [tokens], high [tokens])} of a payload."""
    rows, cols = record["grid"]["rows"], record["grid"]["cols"]
    return {view["name"]: (np.frombuffer(base64.b64decode(view["cells"]), np.uint8).reshape(-1, rows, cols),
                           np.asarray(view["low"]), np.asarray(view["high"])) for view in record["views"]}


def _check_payload(backend, request_id, image, layer, head, aggregation):
    record = payload(backend, request_id, image, layer, head, aggregation)
    trace = backend.trace(request_id)
    layout = trace.images[0]
    assert record["tokens"] == list(trace.answer_texts)
    assert record["grid"] == {"rows": layout.rows, "cols": layout.cols,
                              "box": [int(round(v)) for v in layout.box]}
    assert record["image_size"] == list(image.size)
    shown = Image.open(io.BytesIO(base64.b64decode(record["image"].split(",", 1)[1])))
    assert max(shown.size) <= 512 and shown.size[0] / shown.size[1] == pytest.approx(image.size[0] / image.size[1],
                                                                                      rel=0.02)
    views = _views(record)
    assert {"attention", "tam", "tam_raw"} <= set(views)
    assert record["views"][0]["caption"] == f"attention, layers {layer}, heads {head}, {aggregation}"
    # the costly methods are offered by name and description, fetched on pin
    assert [entry["name"] for entry in record["costly"]] == costly_methods()
    assert {"relevancy", "cleann"} <= set(costly_methods()) and not {"attention", "tam"} & set(costly_methods())
    assert all(entry["description"] == METHODS[entry["name"]].description for entry in record["costly"])
    for token in range(trace.n_answer):
        expected = {"attention": backend.explain(request_id, "attention", token, layers=layer, heads=head,
                                                 aggregation=aggregation).maps[0],
                    **{name: grids[0] for name, grids in backend.explain(request_id, "tam", token).all_maps().items()}}
        for name, library_map in expected.items():
            cells, low, high = views[name]
            span = float(library_map.max() - library_map.min())
            np.testing.assert_allclose(dequantize(cells[token], low[token], high[token]), library_map,
                                       atol=span / 255 + 1e-7)
            np.testing.assert_array_equal(cells[token], quantize(library_map)[0])
    # the text pattern: each word's attention to every text position before it, none to image tokens or later
    text = record["text"]
    assert not set(text["positions"]) & {int(p) for p in layout.token_positions}
    assert [trace.token_texts[p] for p in text["positions"]] == text["texts"]
    levels = np.frombuffer(base64.b64decode(text["cells"]), np.uint8).reshape(trace.n_answer, -1)
    for token in range(trace.n_answer):
        scores = backend.explain(request_id, "attention", token, layers=layer, heads=head,
                                 aggregation=aggregation).text_scores
        expected = np.array([scores[p] if p < len(scores) else 0.0 for p in text["positions"]], np.float32)
        np.testing.assert_array_equal(levels[token], quantize(expected)[0])
        assert all(levels[token][k] == 0 for k, p in enumerate(text["positions"]) if p >= len(scores))
    return record


def test_payload_holds_every_tokens_maps_in_process_and_over_http(service):
    image = make_scene(160, 96)
    request_id, _ = run_generation(service, image, "Describe the image.", max_new_tokens=6)
    in_process = _check_payload(service, request_id, image, "1", "2", "max")
    remote = RemoteService(client=TestClient(create_api(service)))
    remote_id, _ = run_generation(remote, image, "Describe the image.", max_new_tokens=6)
    over_http = _check_payload(remote, remote_id, image, "1", "2", "max")
    assert _views(over_http)["tam"][0].tobytes() == _views(in_process)["tam"][0].tobytes()
    # another layer / head is another attention map
    other = _views(payload(service, request_id, image, "all", "all", "mean"))["attention"][0]
    assert not np.array_equal(other, _views(in_process)["attention"][0])


def test_a_costly_map_is_fetched_for_one_token_in_process_and_over_http(service):
    image = make_scene(160, 96)
    remote = RemoteService(client=TestClient(create_api(service)))
    for backend in (service, remote):
        request_id, _ = run_generation(backend, image, "Describe the image.", max_new_tokens=4)
        answer = costly_maps(backend, {"request_id": request_id, "method": "relevancy", "token": 2})
        expected = backend.explain(request_id, "relevancy", 2).all_maps()
        assert answer["token"] == 2 and answer["seconds"] >= 0
        assert [view["name"] for view in answer["views"]] == list(expected)  # relevancy and its variants
        for view in answer["views"]:
            cells, low, high = quantize(expected[view["name"]][0])
            assert base64.b64decode(view["cells"]) == cells.tobytes()
            assert (view["low"], view["high"]) == ([low], [high])
        # a bad query is one message for the page's progress note, not a server error
        with pytest.raises(UserInputError, match="fetch one of"):
            costly_maps(backend, {"request_id": request_id, "method": "tam", "token": 0})
        with pytest.raises(UserInputError, match="out of range"):
            costly_maps(backend, {"request_id": request_id, "method": "relevancy", "token": 99})
    with pytest.raises(UnknownRequestError, match="generate an answer first"):
        costly_maps(service, {"request_id": "nope", "method": "relevancy", "token": 0})


@contextlib.contextmanager
def _launched(backend, limits: dict):
    """The page as app.py launches it on `backend` with hosted `limits` (empty: none); yields an HTTP client of it."""
    port = free_port()
    page = launch(backend, limits, port=port, block=False)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client
    finally:
        page.close()


def test_the_pages_own_route_answers_a_costly_map_in_process_and_over_http(service):
    """The route the linked views fetch a pinned word's costly map from: the library's map at 8 bits for the
    request's id, one message (and status) for an unknown request, a bad query or a body that is not JSON."""
    image = make_scene(160, 96)
    remote = RemoteService(client=TestClient(create_api(service)))
    for backend in (service, remote):
        request_id, _ = run_generation(backend, image, "Describe the image.", max_new_tokens=4)
        with _launched(backend, {}) as page:
            answer = page.post(COSTLY_ROUTE, json={"request_id": request_id, "method": "cleann", "token": 1})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            expected = backend.explain(request_id, "cleann", 1).all_maps()
            assert (body["request_id"], body["method"], body["token"]) == (request_id, "cleann", 1)
            assert [view["name"] for view in body["views"]] == list(expected)
            for view in body["views"]:
                cells, low, high = quantize(expected[view["name"]][0])
                assert base64.b64decode(view["cells"]) == cells.tobytes()  # 8 bits a cell, as the cheap maps
                assert (view["low"], view["high"]) == ([low], [high])
            # only a request the page's backend holds is answered: an id it never issued is not
            refused = page.post(COSTLY_ROUTE, json={"request_id": "0" * 32, "method": "relevancy", "token": 0})
            assert refused.status_code == 404 and "generate an answer first" in refused.json()["error"]
            for query, message in [({"request_id": request_id, "method": "tam", "token": 0}, "fetch one of"),
                                   ({"request_id": request_id, "method": "relevancy", "token": "1"}, "by its index"),
                                   ({"request_id": request_id, "method": "relevancy", "token": 99}, "out of range")]:
                refused = page.post(COSTLY_ROUTE, json=query)
                assert refused.status_code == 400 and message in refused.json()["error"], (query, refused.text)
            refused = page.post(COSTLY_ROUTE, content=b"token=1", headers={"Content-Type": "application/json"})
            assert refused.status_code == 400 and "as JSON" in refused.json()["error"]


def test_the_costly_route_keeps_the_hosted_pages_rate_limit(service):
    request_id, _ = run_generation(service, make_scene(160, 96), "Describe the image.", max_new_tokens=4)
    query = {"request_id": request_id, "method": "relevancy", "token": 0}
    with _launched(service, {**hosted_limits(), "rate_limit_per_minute": 2}) as page:
        assert [page.post(COSTLY_ROUTE, json=query).status_code for _ in range(2)] == [200, 200]
        refused = page.post(COSTLY_ROUTE, json=query)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "too many requests from your address (at most 2 a minute)" in refused.json()["error"]


def test_quantize_keeps_a_flat_map_flat():
    cells, low, high = quantize(np.full((2, 3), 0.25, np.float32))
    assert not cells.any() and low == high == 0.25
    np.testing.assert_array_equal(dequantize(cells, low, high), np.full((2, 3), 0.25))


def _cell_point(canvas, grid: dict, image_size, row: int, col: int) -> dict:
    """The middle of a grid cell on the canvas, in the canvas' CSS pixels."""
    box, size = canvas.bounding_box(), image_size
    x = grid["box"][0] + (col + 0.5) * (grid["box"][2] - grid["box"][0]) / grid["cols"]
    y = grid["box"][1] + (row + 0.5) * (grid["box"][3] - grid["box"][1]) / grid["rows"]
    return {"x": box["x"] + x / size[0] * box["width"], "y": box["y"] + y / size[1] * box["height"]}


def _walk_linked_views(page, service, request_id, trace, image) -> None:
    """Every token hovered shows the library's attention and TAM maps; a pin draws a costly map (relevancy) fetched
    for the token and kept in the page; a word clicked in the answer strip is pinned here too; a brushed region
    gives every word's mean value there."""
    page.get_by_role("tab", name="Linked views").click()
    tokens = page.locator("#linked-views .lv-token")
    tokens.first.wait_for(timeout=60_000)
    assert tokens.count() == trace.n_answer
    maps = page.locator("#linked-views canvas.lv-map")
    for index in range(trace.n_answer):
        tokens.nth(index).hover()
        for canvas, name in [(maps.nth(0), "attention"), (maps.nth(1), "tam")]:
            assert (canvas.get_attribute("data-map"), canvas.get_attribute("data-token")) == (name, str(index))
            expected = service.explain(request_id, name, index).maps[0]
            shown = [int(v) for v in canvas.get_attribute("data-cells").split(",")]
            assert shown == quantize(expected)[0].ravel().tolist(), (index, name)
    page.mouse.move(0, 0)  # off the words: the views show the pinned one again
    assert maps.nth(0).get_attribute("data-token") == "0"
    # a costly map as the second view: computed for the pinned word (0) with a progress note, then drawn; fetched
    # from the page's own route (not a Gradio event or server function)
    second = maps.nth(1)
    drawn = "(t) => {const c = document.querySelectorAll('#linked-views canvas.lv-map')[1]; " \
            "return c.dataset.map === 'relevancy' && c.dataset.state === 'drawn' && c.dataset.token === String(t);}"
    for index in (0, 3):
        with page.expect_response(lambda response: response.url.endswith(COSTLY_ROUTE), timeout=60_000) as fetched:
            if index:
                tokens.nth(index).click()  # the pin shows at once; its relevancy follows
                assert "lv-pinned" in tokens.nth(index).get_attribute("class")
                assert maps.nth(0).get_attribute("data-token") == str(index)
            else:
                page.locator("#linked-views .lv-second").select_option("relevancy")
        assert fetched.value.status == 200
        assert (fetched.value.json()["method"], fetched.value.json()["token"]) == ("relevancy", index)
        page.wait_for_function(drawn, arg=index, timeout=60_000)
        expected = service.explain(request_id, "relevancy", index).maps[0]
        assert second.get_attribute("data-cells") == ",".join(map(str, quantize(expected)[0].ravel()))
    # another word hovered has no relevancy yet (it says how to get one); back on 3 it is the kept map
    tokens.nth(1).hover()
    assert second.get_attribute("data-state") == "not computed"
    assert "click «" in page.locator("#linked-views .lv-progress").nth(1).inner_text()
    tokens.nth(3).hover()
    assert second.get_attribute("data-state") == "drawn" and second.get_attribute("data-token") == "3"
    # a word clicked in the answer strip is the one pinned here (its relevancy fetched too)
    page.locator("#answer-tokens .token").nth(5).click()
    page.wait_for_function("document.querySelector('#linked-views .lv-token.lv-pinned')?.dataset.index === '5'",
                           timeout=30_000)
    page.wait_for_function(drawn, arg=5, timeout=60_000)
    # brushing a region of the attention map: every word's mean attention over its cells
    record = payload(service, request_id, image)
    grid, attention = record["grid"], maps.nth(0)
    page.mouse.move(**_cell_point(attention, grid, image.size, 1, 1))
    page.mouse.down()
    page.mouse.move(**_cell_point(attention, grid, image.size, 3, 4), steps=4)
    page.mouse.up()
    root = page.locator("#linked-views .lv-root")
    assert root.get_attribute("data-reverse-region") == "1,1,3,4"
    shown = [float(v) for v in root.get_attribute("data-reverse-values").split(",")]
    for token in range(trace.n_answer):
        library = service.explain(request_id, "attention", token).maps[0]
        cells, low, high = quantize(library)
        assert shown[token] == pytest.approx(dequantize(cells, low, high)[1:4, 1:5].mean(), rel=1e-5)
    assert page.locator("#linked-views .lv-token[data-value]").count() == trace.n_answer
    assert "rows 1-3, cols 1-4" in page.locator("#linked-views .lv-reverse").inner_text()
    page.mouse.move(**_cell_point(attention, grid, image.size, 5, 5))  # the region stays after the drag
    assert root.get_attribute("data-reverse-region") == "1,1,3,4"


@contextlib.contextmanager
def _walked_page(url, service, tmp_path):
    """A Chromium page at `url` that generated the page's default request on a scene and walked every word's linked
    views; yields (page, request_id, trace, image)."""
    from playwright.sync_api import sync_playwright

    image = make_scene(160, 96)
    path = tmp_path / "scene.png"
    image.save(path)
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=32)  # page default
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _generate(page, url, path)
        _walk_linked_views(page, service, request_id, trace, image)
        yield page, request_id, trace, image
        browser.close()


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed (make test installs it)")
def test_linked_views_show_the_librarys_maps_over_the_http_backend(backend_app_url, service, tmp_path):
    with _walked_page(backend_app_url, service, tmp_path) as (page, _, _, _):
        page.screenshot(path=str(ARTIFACTS / "linked-views-backend.png"), full_page=True)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed (make test installs it)")
def test_hovering_tokens_redraws_their_maps_and_a_click_pins_one(app_url, service, tmp_path):
    with _walked_page(app_url, service, tmp_path) as (page, request_id, trace, image):
        page.locator("#linked-views .lv-second").select_option("tam")
        tokens = page.locator("#linked-views .lv-token")
        tokens.first.wait_for(timeout=60_000)
        assert tokens.count() == trace.n_answer
        attention_canvas = page.locator("#linked-views canvas.lv-map[data-map=attention]")
        tam_canvas = page.locator("#linked-views canvas.lv-map[data-map=tam]")
        assert attention_canvas.bounding_box()["width"] >= 448
        positions = payload(service, request_id, image)["text"]["positions"]
        for index in range(trace.n_answer):
            tokens.nth(index).hover()
            assert attention_canvas.get_attribute("data-token") == str(index)
            expected = {"attention": service.explain(request_id, "attention", index).maps[0],
                        "tam": service.explain(request_id, "tam", index).maps[0]}
            for canvas, name in [(attention_canvas, "attention"), (tam_canvas, "tam")]:
                shown = [int(v) for v in canvas.get_attribute("data-cells").split(",")]
                assert shown == quantize(expected[name])[0].ravel().tolist(), (index, name)
            pattern = page.locator("#linked-views .lv-text")
            assert pattern.get_attribute("data-token") == str(index)
            text_scores = service.explain(request_id, "attention", index).text_scores
            expected_text = [text_scores[p] if p < len(text_scores) else 0.0 for p in positions]
            assert pattern.get_attribute("data-values") == ",".join(
                map(str, quantize(np.array(expected_text, np.float32))[0]))
            caption = page.locator("#linked-views figcaption").first.inner_text()
            assert "attention, layers all, heads all, mean" in caption
        # the strip: one small TAM map under every answer word; hovering one shows that word in the large views
        strip = page.locator("#linked-views .lv-strip figure")
        assert strip.count() == trace.n_answer
        assert page.locator("#linked-views .lv-strip canvas[data-map=tam]").count() == trace.n_answer
        strip.nth(5).hover()
        assert attention_canvas.get_attribute("data-token") == "5" and "lv-shown" in strip.nth(5).get_attribute("class")
        # one colour scale for every word: the shown levels are the values on the answer's whole range
        page.locator("#linked-views .lv-shared").check()
        record = payload(service, request_id, image)
        tam = next(view for view in record["views"] if view["name"] == "tam")
        levels = np.frombuffer(base64.b64decode(tam["cells"]), np.uint8).reshape(trace.n_answer, -1)
        low, high = min(tam["low"]), max(tam["high"])
        values = np.array(tam["low"])[:, None] + levels / 255 * (np.array(tam["high"]) - np.array(tam["low"]))[:, None]
        on_one_scale = np.floor((values - low) / (high - low) * 255 + 0.5).astype(int)
        for index in (2, 7):
            tokens.nth(index).hover()
            assert tam_canvas.get_attribute("data-shared") == "true"
            assert tam_canvas.get_attribute("data-cells") == ",".join(map(str, on_one_scale[index])), index
        page.locator("#linked-views .lv-shared").uncheck()
        page.locator("#linked-views .lv-smooth").check()
        assert tam_canvas.get_attribute("data-smooth") == "true"
        page.screenshot(path=str(ARTIFACTS / "linked-views-smoothed.png"), full_page=True)
        page.locator("#linked-views .lv-smooth").uncheck()
        # the reverse view: hovering the middle of the map colours every token by its attention there (a click
        # first clears the brushed region)
        attention_canvas.click()
        attention_canvas.hover()
        assert page.locator("#linked-views .lv-token[data-value]").count() == trace.n_answer
        page.screenshot(path=str(ARTIFACTS / "linked-views-reverse.png"), full_page=True)
        # a click pins the token, and the server-side panels follow it
        before = page.locator("#attention-map img").get_attribute("src")
        tokens.nth(3).click()
        page.wait_for_function(f"document.querySelector('#attention-map img').getAttribute('src') !== {before!r}",
                               timeout=30_000)
        assert "lv-pinned" in tokens.nth(3).get_attribute("class")
        page.get_by_role("tab", name="Methods").click()
        page.wait_for_function("document.querySelector('#method-map img') !== null", timeout=30_000)
        tam_picture = render_method(service, request_id, image, 3, "tam")[0]
        np.testing.assert_array_equal(_shown_image(page, "#method-map"), np.asarray(tam_picture))
        page.screenshot(path=str(ARTIFACTS / "linked-views.png"), full_page=True)
