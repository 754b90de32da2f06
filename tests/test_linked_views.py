"""The linked views drawn in the browser: the payload carries every token's library maps at 8 bits (in process and
over HTTP), and in Chromium hovering a token shows its maps with no round trip while a click pins it for the other
panels."""

import base64
import io
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from components.generation import run_generation
from components.linked_views import dequantize, payload, quantize
from components.method_panel import render_method
from lvlm_interpret import ExplainService
from lvlm_interpret.client import RemoteService
from lvlm_interpret.server import create_api
from tests.conftest import make_scene
from tests.test_browser import (  # noqa: F401 (app_url: a fixture)
    ARTIFACTS, CHROMIUM, FLAGS, _generate, _shown_image, app_url,
)


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


def test_quantize_keeps_a_flat_map_flat():
    cells, low, high = quantize(np.full((2, 3), 0.25, np.float32))
    assert not cells.any() and low == high == 0.25
    np.testing.assert_array_equal(dequantize(cells, low, high), np.full((2, 3), 0.25))


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed (make test installs it)")
def test_hovering_tokens_redraws_their_maps_and_a_click_pins_one(app_url, service, tmp_path):
    from playwright.sync_api import sync_playwright

    image = make_scene(160, 96)
    path = tmp_path / "scene.png"
    image.save(path)
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=32)  # page default
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _generate(page, app_url, path)
        page.get_by_role("tab", name="Linked views").click()
        tokens = page.locator("#linked-views .lv-token")
        tokens.first.wait_for(timeout=60_000)
        assert tokens.count() == trace.n_answer
        attention_canvas = page.locator("#linked-views canvas.lv-map[data-map=attention]")
        tam_canvas = page.locator("#linked-views canvas.lv-map[data-map=tam]")
        assert attention_canvas.bounding_box()["width"] >= 448
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
            positions = payload(service, request_id, image)["text"]["positions"] if index == 0 else positions
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
        # the reverse view: hovering the middle of the map colours every token by its attention there
        attention_canvas.hover()
        assert page.locator("#linked-views .lv-token[data-value]").count() == trace.n_answer
        page.screenshot(path=str(ARTIFACTS / "linked-views-reverse.png"), full_page=True)
        # a click pins the token, and the server-side panels follow it
        before = page.locator("#attention-map img").get_attribute("src")
        tokens.nth(3).click()
        page.wait_for_function(f"document.querySelector('#attention-map img').getAttribute('src') !== {before!r}",
                               timeout=30_000)
        assert "lv-pinned" in tokens.nth(3).get_attribute("class")
        page.get_by_role("tab", name="Relevancy / TAM / CLEANN").click()
        page.wait_for_function("document.querySelector('#method-map img') !== null", timeout=30_000)
        tam_picture = render_method(service, request_id, image, 3, "tam")[0]
        np.testing.assert_array_equal(_shown_image(page, "#method-map"), np.asarray(tam_picture))
        page.screenshot(path=str(ARTIFACTS / "linked-views.png"), full_page=True)
        browser.close()
