"""The web page in a real browser (Debian's Chromium via Playwright): upload, generate, click tokens."""

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import analysis_panel
from components.attention_panel import OVERVIEW_CELL_PX, OVERVIEW_LEFT_PX, OVERVIEW_TOP_PX, render_attention
from components.generation import run_generation
from components.method_panel import render_method
from lvlm_interpret import ExplainService
from tests.conftest import make_scene

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed "
                                                                       "(make test installs it)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(command: list[str], url: str) -> subprocess.Popen:
    """Start a server process and wait until `url` answers."""
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(process.stdout.read().decode()[-3000:])
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{command} did not answer at {url} within 120 s")


def _page_server(model: str):
    """Serve the page on `model` in its own process for the module's tests; yields its URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start([sys.executable, "app.py", "--model", model, "--port", str(port), "--device", "cpu"], url)
    yield url
    process.terminate()
    process.wait(timeout=30)


def _backend_page_server(model: str):
    """Serve the front end with no model, talking to `python -m lvlm_interpret serve --model MODEL` over HTTP; yields
    the front end's URL."""
    api_port, app_port = _free_port(), _free_port()
    backend = _start([sys.executable, "-m", "lvlm_interpret", "serve", "--model", model, "--port", str(api_port),
                      "--device", "cpu"], f"http://127.0.0.1:{api_port}/v1/health")
    url = f"http://127.0.0.1:{app_port}"
    front = _start([sys.executable, "app.py", "--backend", f"http://127.0.0.1:{api_port}", "--port", str(app_port)],
                   url)
    yield url
    for process in (front, backend):
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def app_url():
    yield from _page_server("random:llava")


@pytest.fixture(scope="module")
def backend_app_url():
    yield from _backend_page_server("random:llava")


@pytest.fixture(scope="module")
def demo_app_url():
    yield from _page_server("demo")


@pytest.fixture(scope="module")
def demo_backend_app_url():
    yield from _backend_page_server("demo")


def _shown_image(page, selector) -> np.ndarray:
    from playwright.sync_api import Error as PlaywrightError

    for attempt in range(3):  # a picture replaced while it is fetched aborts the fetch: read the new one
        src = page.locator(f"{selector} img").get_attribute("src")
        if src.startswith("data:"):
            import base64
            return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
        try:
            return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
        except PlaywrightError:
            if attempt == 2:
                raise
            page.wait_for_timeout(500)


def _generate(page, url: str, path, prompt: str = "Describe the image.") -> None:
    """Open the page at `url`, upload the image at `path`, ask `prompt` and wait for the answer."""
    page.goto(url)
    page.locator("#input-image input[type=file]").set_input_files(str(path))
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#answer textarea').value.length > 0", timeout=60_000)


def test_upload_generate_and_click_tokens(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    image = make_scene(160, 96)
    path = tmp_path / "scene.png"
    image.save(path)
    ARTIFACTS.mkdir(exist_ok=True)
    # the same deterministic model in-process gives the maps the page must show
    service = ExplainService(default_model="random:llava", device="cpu")
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=32)  # page default

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _generate(page, app_url, path)
        assert page.locator("#answer textarea").input_value() == trace.answer
        tokens = page.locator("#answer-tokens .token")
        assert tokens.count() == trace.n_answer

        seen = []
        for index in (1, 3):
            before = page.locator("#attention-map img").get_attribute("src")
            tokens.nth(index).click()
            page.wait_for_function(
                f"document.querySelector('#attention-map img').getAttribute('src') !== {before!r}", timeout=30_000)
            classes = [tokens.nth(k).get_attribute("class") or "" for k in range(tokens.count())]
            assert [k for k, c in enumerate(classes) if "highlighted" in c] == [index]
            shown = _shown_image(page, "#attention-map")
            expected = np.asarray(render_attention(service, request_id, image, index))
            np.testing.assert_array_equal(shown, expected)
            seen.append(shown)
            # the method panel follows the same token (TAM by default)
            page.get_by_role("tab", name="Methods").click()
            page.wait_for_function("document.querySelector('#method-map img') !== null", timeout=30_000)
            tam_picture = render_method(service, request_id, image, index, "tam")[0]
            np.testing.assert_array_equal(_shown_image(page, "#method-map"), np.asarray(tam_picture))
            page.screenshot(path=str(ARTIFACTS / f"method-view-token{index}.png"), full_page=True)
            page.get_by_role("tab", name="Attention").click()
        assert not np.array_equal(seen[0], seen[1])
        # CLEANN with a chosen head: its controls appear with the method, and the map is that head's set
        page.get_by_role("tab", name="Methods").click()
        page.locator("#method label", has_text="cleann").click()
        page.wait_for_function("document.querySelector('#method-summary').innerText.includes('CLEANN')",
                               timeout=60_000)
        page.locator("#cleann-head input").click()
        page.get_by_role("option", name="0", exact=True).click()
        page.wait_for_function("document.querySelector('#method-summary').innerText.includes('head 0)')",
                               timeout=60_000)
        cleann_picture = render_method(service, request_id, image, 3, "cleann", None, {"head": 0})[0]
        np.testing.assert_array_equal(_shown_image(page, "#method-map"), np.asarray(cleann_picture))
        page.screenshot(path=str(ARTIFACTS / "cleann-head.png"), full_page=True)
        page.get_by_role("tab", name="Attention").click()
        # reverse view: clicking the middle of the attention picture scores every answer token
        page.locator("#attention-map img").click()
        page.wait_for_function(f"document.querySelectorAll('#reverse-view .token').length === {trace.n_answer}",
                               timeout=30_000)
        # overview: clicking the cell of layer 1, head 2 selects them
        overview = page.locator("#attention-overview img")
        scale = overview.bounding_box()["width"] / page.evaluate(
            "document.querySelector('#attention-overview img').naturalWidth")
        overview.click(position={"x": (OVERVIEW_LEFT_PX + 2 * OVERVIEW_CELL_PX + 12) * scale,
                                 "y": (OVERVIEW_TOP_PX + 1 * OVERVIEW_CELL_PX + 12) * scale})
        page.wait_for_function("document.querySelector('#layer input').value === '1' && "
                               "document.querySelector('#head input').value === '2'", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "attention-view.png"), full_page=True)
        # the analyses tab was filled after generation: the lens spans the model's layers, at the last one
        page.get_by_role("tab", name="Analyses").click()
        page.wait_for_function("document.querySelector('#analysis-lens .js-plotly-plot') !== null", timeout=30_000)
        assert page.locator("#analysis-lens-layer input[type=number]").input_value() == str(trace.n_layers - 1)
        page.get_by_role("tab", name="Side by side").click()
        page.wait_for_function("document.querySelectorAll('#comparison img').length >= 8", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "side-by-side.png"), full_page=True)
        # export: the request as JSON + NPZ, the same contract as the CLI
        page.get_by_text("Export").click()
        page.locator("#export-request").click()
        page.wait_for_function("document.querySelectorAll('#export-files a').length >= 2", timeout=60_000)
        links = {link.get_attribute("download"): link.get_attribute("href")
                 for link in page.locator("#export-files a").all()}
        assert set(links) == {"result.json", "maps.npz"}
        exported = page.request.get(links["result.json"]).json()
        assert exported["answer"] == trace.answer and len(exported["tokens"]) == trace.n_answer
        assert {"image", "methods", "timings_s", "llr", "cleann"} <= set(exported)
        # CLEANN as chosen in the page (head 0, token 3)
        assert exported["method_options"]["cleann"] == {"head": 0}
        assert exported["cleann"]["3"]["head"] == 0
        browser.close()


def test_front_end_over_the_http_backend(backend_app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    image = make_scene(160, 96)
    path = tmp_path / "scene.png"
    image.save(path)
    service = ExplainService(default_model="random:llava", device="cpu")
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=32)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _generate(page, backend_app_url, path)
        assert page.locator("#answer textarea").input_value() == trace.answer
        before = page.locator("#attention-map img").get_attribute("src")
        page.locator("#answer-tokens .token").nth(2).click()
        page.wait_for_function(
            f"document.querySelector('#attention-map img').getAttribute('src') !== {before!r}", timeout=30_000)
        np.testing.assert_array_equal(_shown_image(page, "#attention-map"),
                                      np.asarray(render_attention(service, request_id, image, 2)))
        page.screenshot(path=str(ARTIFACTS / "backend-mode.png"), full_page=True)
        # the analyses run on the backend too: the lens at the last layer, then an ablation and a knockout of the
        # tokens under a box
        page.get_by_role("tab", name="Analyses").click()
        page.wait_for_function("document.querySelector('#analysis-lens .js-plotly-plot') !== null", timeout=30_000)
        assert page.locator("#analysis-lens-layer input[type=number]").input_value() == str(trace.n_layers - 1)
        page.locator("#analysis-box textarea, #analysis-box input").first.fill("0,0,80,96")
        page.locator("#analysis-ablate").click()
        page.wait_for_function("document.querySelector('#analysis-summary').innerText.includes('ablation of')",
                               timeout=60_000)
        page.locator("#analysis-knockout").click()
        page.wait_for_function("document.querySelector('#analysis-summary').innerText.includes('Knockout')",
                               timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "backend-analyses.png"), full_page=True)
        # CLEANN over the backend: its panel renders, and with it chosen the next click and generation still work
        page.get_by_role("tab", name="Methods").click()
        page.locator("#method label", has_text="cleann").click()
        page.wait_for_function("document.querySelector('#method-summary').innerText.includes('CLEANN')",
                               timeout=60_000)
        np.testing.assert_array_equal(_shown_image(page, "#method-map"),
                                      np.asarray(render_method(service, request_id, image, 2, "cleann")[0]))
        for action, token in [(lambda: page.locator("#answer-tokens .token").nth(3).click(), 3),
                              (lambda: page.locator("#generate").click(), 0)]:  # a new answer starts at token 0
            # the attention map differs per token and comes in the same answer as the method map (CLEANN's sets
            # may be empty for both tokens, giving the same picture)
            before = page.locator("#attention-map img").get_attribute("src")
            action()
            page.wait_for_function(
                f"document.querySelector('#attention-map img').getAttribute('src') !== {before!r}", timeout=60_000)
            np.testing.assert_array_equal(_shown_image(page, "#method-map"),
                                          np.asarray(render_method(service, request_id, image, token, "cleann")[0]))
        assert page.get_by_text("Error").count() == 0
        # the model list offers what the backend answers with, and nothing else
        config = page.request.get(f"{backend_app_url}/config").json()
        (model,) = [c["props"] for c in config["components"] if c.get("props", {}).get("elem_id") == "model"]
        assert [value for _, value in model["choices"]] == ["random:llava"]
        page.screenshot(path=str(ARTIFACTS / "backend-cleann.png"), full_page=True)
        browser.close()


def test_bad_input_in_the_page_is_one_notice_and_the_page_keeps_working(app_url, tmp_path):
    """What a stranger may send through the page: a file that is no image, a truncated PNG, an empty prompt. Each
    is one readable notice (no stack trace, no server path), and the next good request is answered."""
    from playwright.sync_api import sync_playwright

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not pixels")
    whole = io.BytesIO()
    make_scene(160, 96).save(whole, format="PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    good = tmp_path / "scene.png"
    make_scene(160, 96).save(good)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url)
        for path, prompt, message in [(not_an_image, "Describe the image.", "not a readable image"),
                                      (truncated, "Describe the image.", "corrupt or truncated"),
                                      (good, "   ", "prompt is empty")]:
            page.locator("#input-image input[type=file]").set_input_files(str(path))
            page.locator("#prompt textarea").fill(prompt)
            page.locator("#generate").click()
            notice = page.get_by_text(message).first
            notice.wait_for(timeout=60_000)
            text = notice.inner_text()
            assert "Traceback" not in text and "/tmp" not in text and str(ROOT) not in text
            assert page.locator("#answer textarea").input_value() == ""
            page.screenshot(path=str(ARTIFACTS / f"bad-input-{path.stem}.png"), full_page=True)
            page.reload()
        page.locator("#input-image input[type=file]").set_input_files(str(good))
        page.locator("#prompt textarea").fill("Describe the image.")
        page.locator("#generate").click()
        page.wait_for_function("document.querySelector('#answer textarea').value.length > 0", timeout=60_000)
        browser.close()


def test_picking_an_example_runs_it_and_the_views_say_what_they_show(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url)
        page.get_by_text("What color is the triangle?").first.click()
        page.wait_for_function("document.querySelector('#answer textarea').value.length > 0", timeout=60_000)
        assert page.locator("#prompt textarea").input_value() == "What color is the triangle?"
        page.wait_for_function("document.querySelector('#request-status').innerText.includes('Showing')",
                               timeout=30_000)
        assert "What color is the triangle?" in page.locator("#request-status").inner_text()
        # editing the prompt marks the views as answering the earlier one
        page.locator("#prompt textarea").press("End")
        page.keyboard.type(" Answer briefly.")  # typed as a user types (fill sets the value without key events)
        page.wait_for_function("document.querySelector('#request-status').innerText.includes('prompt changed')",
                               timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "example-and-stale.png"), full_page=True)
        browser.close()


def test_a_failed_request_leaves_no_error_badge_and_the_page_takes_clicks(app_url, tmp_path):
    """A refused request is one notice: the panels keep their last results with no "Error" badge over them (it used
    to stay over later results and, over the answer strip or a picture, to take every click); an unreadable upload
    leaves no broken picture and marks the views stale; the answer shows once, as the strip of words."""
    from playwright.sync_api import sync_playwright

    good, not_an_image = tmp_path / "scene.png", tmp_path / "notes.png"
    make_scene(160, 96).save(good)
    not_an_image.write_text("these are notes, not pixels")
    badges = "[data-testid=status-tracker]:has-text('Error')"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url)
        page.locator("#generate").click()  # before any image
        page.get_by_text("upload an image first").first.wait_for(timeout=30_000)
        page.locator("#input-image input[type=file]").set_input_files(str(good))
        page.locator("#generate").click()
        page.wait_for_function("document.querySelector('#answer textarea').value.length > 0", timeout=60_000)
        page.wait_for_function("document.querySelector('#request-status').innerText.includes('Showing')",
                               timeout=30_000)
        assert page.locator(badges).count() == 0
        assert not page.locator("#answer").is_visible() and page.locator("#answer-tokens .token").count() > 2
        page.get_by_role("tab", name="Attention").click()
        # an unreadable upload, then Generate: notices, no broken picture, the views marked as the earlier answer's
        page.locator("#input-image input[type=file]").set_input_files(str(not_an_image))
        page.get_by_text("not a readable image").first.wait_for(timeout=30_000)
        page.wait_for_function("document.querySelector('#request-status').innerText.includes('image changed')",
                               timeout=30_000)
        assert page.locator("#input-image img").count() == 0
        page.locator("#generate").click()
        page.get_by_text("upload an image first").first.wait_for(timeout=30_000)
        page.wait_for_timeout(1000)  # the failure's answer
        assert page.locator(badges).count() == 0
        # the earlier answer's words still take clicks
        before = page.locator("#attention-map img").get_attribute("src")
        page.locator("#answer-tokens .token").nth(2).click(timeout=10_000)
        page.wait_for_function(f"document.querySelector('#attention-map img').getAttribute('src') !== {before!r}",
                               timeout=30_000)
        # a bad box: one notice, and nothing covers the picture on which a box is drawn
        page.get_by_role("tab", name="Analyses").click()
        box = page.locator("#analysis-box textarea, #analysis-box input").first
        box.fill("5,5,2")
        page.locator("#analysis-ablate").click()
        page.get_by_text("a box is four numbers").first.wait_for(timeout=30_000)
        page.wait_for_timeout(1000)
        assert page.locator(badges).count() == 0
        picture = page.locator("#analysis-tokens img")
        picture.scroll_into_view_if_needed()
        assert picture.evaluate("(img) => { const box = img.getBoundingClientRect(); "
                                "return document.elementFromPoint(box.x + box.width / 2, box.y + box.height / 2) "
                                "=== img; }")
        page.screenshot(path=str(ARTIFACTS / "failed-requests.png"), full_page=True)
        browser.close()


def assert_tiles_legible(page, selector: str) -> None:
    """Every map figure of a gallery (map, colour bar, caption) shown whole at its own aspect ratio, at least 448
    pixels wide (Gradio's square thumbnails shrank and letterboxed them)."""
    tiles = page.locator(selector).all()
    assert tiles
    for tile in tiles:
        tile.scroll_into_view_if_needed()
        shown = tile.bounding_box()
        width, height = tile.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert shown["width"] >= 448, (selector, shown)
        assert shown["height"] == pytest.approx(shown["width"] * height / width, abs=2), (selector, shown)


def test_every_tab_shows_wide_maps_a_drawn_box_and_a_lens_that_follows_the_keys(app_url):
    """At a 1400-pixel window: every tab visible (none under a "more" menu), a tall image's maps at least 448
    pixels wide (the gallery's tiles too, whole), two clicks on the Analyses picture draw a box and show its cells, and the arrow keys on the logit
    lens slider redraw the figure."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url)
        page.get_by_text("What shape is the green object?").first.click()  # the tall example, 160 x 240
        page.wait_for_function("document.querySelector('#answer textarea').value.length > 0", timeout=60_000)
        shown_tabs = [tab.inner_text() for tab in page.get_by_role("tab").all() if tab.is_visible()]
        assert shown_tabs == ["Attention", "Linked views", "Methods", "Side by side", "Analyses", "Trust", "Compare",
                              "Features"]
        for tab, view in (("Attention", "#attention-map"), ("Methods", "#method-map")):
            page.get_by_role("tab", name=tab).click()
            loaded = f"document.querySelector('{view} img') && document.querySelector('{view} img').naturalWidth > 0"
            page.wait_for_function(loaded, timeout=30_000)
            assert page.locator(f"{view} img").bounding_box()["width"] >= 448
        page.get_by_role("tab", name="Side by side").click()
        page.wait_for_function("[...document.querySelectorAll('#comparison img')].filter((img) => img.naturalWidth)"
                               ".length >= 8", timeout=60_000)
        assert_tiles_legible(page, "#comparison img")
        page.screenshot(path=str(ARTIFACTS / "side-by-side-tall.png"), full_page=True)

        page.get_by_role("tab", name="Analyses").click()
        page.wait_for_function("document.querySelector('#analysis-lens .js-plotly-plot') !== null", timeout=30_000)
        picture = page.locator("#analysis-tokens img")
        picture.scroll_into_view_if_needed()
        plain = _shown_image(page, "#analysis-tokens")
        shown = picture.bounding_box()
        scale = shown["width"] / plain.shape[1]
        box = page.locator("#analysis-box textarea, #analysis-box input").first
        corners = "document.querySelector('#analysis-box textarea, #analysis-box input').value.split(',').length"
        picture.click(position={"x": 90 * scale, "y": 120 * scale})
        page.wait_for_function(f"{corners} === 2", timeout=30_000)
        picture.click(position={"x": 10 * scale, "y": 20 * scale})
        page.wait_for_function(f"{corners} === 4", timeout=30_000)
        drawn = [int(v) for v in box.input_value().split(",")]  # in the image's pixels (the click's, +-1)
        np.testing.assert_allclose(drawn, [10, 20, 90, 120], atol=2)
        # the picture shows the box's cells, as the library chooses them
        service = ExplainService(default_model="random:llava", device="cpu")
        image = Image.open(ROOT / "assets" / "examples" / "green-square-blue-circle.png").convert("RGB")
        request_id, _ = run_generation(service, image, "What shape is the green object?", max_new_tokens=32)
        state = {"request_id": request_id, "image": image, "token": 0}
        expected = np.asarray(analysis_panel.drawn_box_picture(service, state, box.input_value(), 0))
        for _ in range(60):  # until the picture is replaced
            if np.array_equal(_shown_image(page, "#analysis-tokens"), expected):
                break
            page.wait_for_timeout(500)
        np.testing.assert_array_equal(_shown_image(page, "#analysis-tokens"), expected)

        title = "document.querySelector('#analysis-lens .gtitle').textContent"
        last = int(page.locator("#analysis-lens-layer input[type=number]").input_value())
        assert f"after layer {last}:" in page.evaluate(title)
        page.locator("#analysis-lens-layer input[type=range]").focus()
        page.keyboard.press("ArrowLeft")
        page.wait_for_function(f"{title}.includes('after layer {last - 1}:')", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "analyses-box-and-lens.png"), full_page=True)
        browser.close()
