"""The Compare tab in a real browser (Debian's Chromium via Playwright): B made from A by changing the image, the
answers' aligned words, a click in either answer selecting the matching word in the other, the maps and numbers
the library computes."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from components.compare_panel import render, run_compare, select_word
from components.generation import run_generation
from lvlm_interpret import ExplainService, load_image
from tests import test_browser
from tests.test_browser import ARTIFACTS, CHROMIUM, FLAGS, ROOT, _generate, assert_tiles_legible

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed "
                                                                       "(make test installs it)")
THREE_OBJECTS = ROOT / "assets/examples/yellow-square-red-square-blue-triangle.png"
TRIANGLE = ROOT / "assets/examples/red-triangle.png"
SELECTED_COLOUR = "245, 158, 11"  # compare_panel's colour of the selected word (#f59e0b), as CSS rgb


demo_app_url = test_browser.demo_app_url  # the page on the demo model, shared


def _open_tab(page, name: str) -> None:
    """Click the tab `name`, through the "More tabs" menu where the tab bar has no room for it."""
    tab = page.get_by_role("tab", name=name)
    if tab.count():
        tab.click()
        return
    page.get_by_role("button", name="More tabs").click()
    page.get_by_role("button", name=name, exact=True).last.click()


def _selected(page, strip: str) -> list[str]:
    """The words of an answer strip shown in the selected colour."""
    words = page.locator(f"{strip} .token")
    return [words.nth(k).inner_text().strip() for k in range(words.count())
            if SELECTED_COLOUR in words.nth(k).evaluate("e => getComputedStyle(e).backgroundColor")]


def _tile(page, index: int) -> np.ndarray:
    src = page.locator("#compare-tiles img").nth(index).get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def test_compare_tab_aligns_words_and_follows_clicks_in_both_answers(demo_app_url):
    from playwright.sync_api import sync_playwright

    # the same deterministic model in process gives what the page must show
    service = ExplainService(default_model="demo", device="cpu")
    request_a, _ = run_generation(service, load_image(THREE_OBJECTS), "Describe the image.", "demo", 32)
    state = run_compare(service, {"request_id": request_a, "image": load_image(THREE_OBJECTS)}, "",
                        load_image(TRIANGLE), "", ["attention", "relevancy", "tam"])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _generate(page, demo_app_url, THREE_OBJECTS)
        _open_tab(page, "Compare")
        # the two trained demo models are each other's default B; this test keeps A's model and changes the image
        model_b = page.locator("#compare-model-b input")
        assert model_b.input_value().startswith("demo-qwen2_vl")
        model_b.click()
        page.get_by_role("option", name="same as A", exact=True).click()
        page.locator("#compare-image-b input[type=file]").set_input_files(str(TRIANGLE))
        page.locator("#compare-run").click()
        page.wait_for_function("document.querySelector('#compare-summary').innerText.includes('token')",
                               timeout=60_000)
        # the first content word both answers share: A's second "red" (token 5), B's token 1
        assert "token 5 of A and token 1 of B" in page.locator("#compare-summary").inner_text()
        assert _selected(page, "#compare-answer-a") == _selected(page, "#compare-answer-b") == ["red"]
        page.wait_for_function("document.querySelectorAll('#compare-tiles img').length === 9", timeout=30_000)
        page.wait_for_function("[...document.querySelectorAll('#compare-tiles img')].every((img) => img.naturalWidth)",
                               timeout=30_000)
        assert_tiles_legible(page, "#compare-tiles img")
        page.screenshot(path=str(ARTIFACTS / "compare-tab.png"), full_page=True)

        # a click on "triangle" in B selects A's "triangle"; the maps and numbers are the library's
        page.locator("#compare-answer-b .token", has_text="triangle").click()
        page.wait_for_function("document.querySelector('#compare-summary').innerText.includes('token 10 of A')",
                               timeout=60_000)
        assert _selected(page, "#compare-answer-a") == ["triangle"]
        state = select_word(state, "b", 2)
        _, _, _, rows, tiles, _ = render(service, state)
        table = page.locator("#compare-similarity").inner_text()
        for name, spearman, top_iou, shift in rows:
            assert name in table and str(spearman) in table and str(shift) in table
        page.wait_for_function("document.querySelectorAll('#compare-tiles img').length === 9", timeout=30_000)
        for index in (0, 1, 2):  # attention: A, B and the difference
            np.testing.assert_array_equal(_tile(page, index), np.asarray(tiles[index]))

        # and back: "a" in A before "red" selects B's "a"; A's "yellow" has no match and says so
        page.locator("#compare-answer-a .token").nth(4).click()
        page.wait_for_function("document.querySelector('#compare-summary').innerText.includes('token 4 of A')",
                               timeout=60_000)
        assert "token 0 of B" in page.locator("#compare-summary").inner_text()
        page.locator("#compare-answer-a .token", has_text="yellow").click()
        page.get_by_text("has no matching word in B").first.wait_for(timeout=30_000)
        assert "token 4 of A" in page.locator("#compare-summary").inner_text()  # the selection stays
        browser.close()
