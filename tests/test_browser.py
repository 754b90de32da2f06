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


@pytest.fixture(scope="module")
def app_url():
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start([sys.executable, "app.py", "--model", "random:llava", "--port", str(port), "--device", "cpu"],
                     url)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def backend_app_url():
    """The front end with no model, talking to `python -m lvlm_interpret serve` over HTTP."""
    api_port, app_port = _free_port(), _free_port()
    backend = _start([sys.executable, "-m", "lvlm_interpret", "serve", "--model", "random:llava", "--port",
                      str(api_port), "--device", "cpu"], f"http://127.0.0.1:{api_port}/v1/health")
    url = f"http://127.0.0.1:{app_port}"
    front = _start([sys.executable, "app.py", "--backend", f"http://127.0.0.1:{api_port}", "--port", str(app_port)],
                   url)
    yield url
    for process in (front, backend):
        process.terminate()
        process.wait(timeout=30)


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
            page.get_by_role("tab", name="Relevancy / TAM / CLEANN").click()
            page.wait_for_function("document.querySelector('#method-map img') !== null", timeout=30_000)
            tam_picture = render_method(service, request_id, image, index, "tam")[0]
            np.testing.assert_array_equal(_shown_image(page, "#method-map"), np.asarray(tam_picture))
            page.screenshot(path=str(ARTIFACTS / f"method-view-token{index}.png"), full_page=True)
            page.get_by_role("tab", name="Attention").click()
        assert not np.array_equal(seen[0], seen[1])
        # CLEANN with a chosen head: its controls appear with the method, and the map is that head's set
        page.get_by_role("tab", name="Relevancy / TAM / CLEANN").click()
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
        page.get_by_role("tab", name="Relevancy / TAM / CLEANN").click()
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
