"""The Features tab in a real browser, on the demo model and its shipped SAE: what the page lists, draws and answers
is what lvlm_interpret.sae computes for the same image, cell and feature, with the model in the page's process and
behind `app.py --backend`."""

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

from lvlm_interpret import GenerationOptions, get_method, load_model
from lvlm_interpret.capture import generate_with_capture
from lvlm_interpret.demo.scenes import HELD_OUT_SEED_START, draw_scene
from lvlm_interpret.rendering import blend, cell_at, overlay
from lvlm_interpret.sae import encode_image, generate_with_feature_edits, load_sae_for, load_top_cells
from tests import test_browser
from tests.test_browser import ARTIFACTS, CHROMIUM, FLAGS, _generate, _shown_image

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed "
                                                                       "(make test installs it)")

PROMPT = "What color is the circle?"
FEATURES_TAB = "Features"  # the tab's label in app.py


demo_app_url, demo_backend_app_url = test_browser.demo_app_url, test_browser.demo_backend_app_url


@pytest.fixture(scope="module")
def library():
    """The demo model and its shipped SAE, in this process."""
    loaded = load_model("demo", device="cpu")
    return loaded, load_sae_for(loaded, "demo")


FEATURE_CELLS = "#sae-cell-features [role=gridcell][data-col='0']"  # the table's first column, row by row


def _listed_features(page) -> list[int]:
    return [int(cell.inner_text()) for cell in page.locator(FEATURE_CELLS).all()]


def _wait_for_text(page, selector: str, text: str) -> None:
    page.wait_for_function(f"(document.querySelector({selector!r}) || {{innerText: ''}}).innerText"
                           f".includes({text!r})", timeout=60_000)


def _click_image_pixel(page, selector: str, x: float, y: float) -> None:
    """Click the picture where pixel (x, y) of its natural-size image is drawn (gradio's object-fit: scale-down)."""
    page.wait_for_function(f"(document.querySelector('{selector} img') || {{}}).naturalWidth > 0", timeout=30_000)
    picture = page.locator(f"{selector} img")
    box = picture.bounding_box()
    natural_width, natural_height = picture.evaluate("(img) => [img.naturalWidth, img.naturalHeight]")
    scale = min(box["width"] / natural_width, box["height"] / natural_height, 1.0)
    left = (box["width"] - natural_width * scale) / 2
    top = (box["height"] - natural_height * scale) / 2
    picture.click(position={"x": left + x * scale, "y": top + y * scale})


def _check_features_tab(url: str, library, tmp_path, name: str) -> None:
    from playwright.sync_api import sync_playwright

    loaded, bundle = library
    scene = draw_scene(HELD_OUT_SEED_START + 3)
    path = tmp_path / "scene.png"
    scene.image.save(path)
    image = scene.image
    grid = encode_image(loaded, bundle, image, PROMPT)
    layout = grid.site.layout
    target = scene.objects[0]
    x, y = (round(v) for v in target.centre)
    row, col = cell_at(layout, x, y)
    expected_top = [f for f, _ in grid.top_features(row, col, 10)]
    assert expected_top, "the object's cell has active features"
    options = GenerationOptions.from_temperature(32, 0.0, 1.0)  # the page's defaults
    ARTIFACTS.mkdir(exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        _generate(page, url, path, PROMPT)
        page.get_by_role("tab", name=FEATURES_TAB).click()
        page.wait_for_function("document.querySelector('#sae-image img') !== null", timeout=30_000)
        np.testing.assert_array_equal(_shown_image(page, "#sae-image"), np.asarray(image))

        # a cell of the object: its top features are the library's, strongest first
        _click_image_pixel(page, "#sae-image", x, y)
        _wait_for_text(page, "#sae-summary", f"Cell ({row}, {col})")
        page.wait_for_function(f"document.querySelectorAll({FEATURE_CELLS!r}).length === {len(expected_top)}",
                               timeout=30_000)
        assert _listed_features(page) == expected_top
        assert page.locator("#sae-feature input").input_value() == str(expected_top[0])

        # a feature of the list: its map on this image and its top patches over the cached scenes
        feature = expected_top[1] if len(expected_top) > 1 else expected_top[0]
        before = page.locator("#sae-image img").get_attribute("src")
        page.locator(FEATURE_CELLS).nth(expected_top.index(feature)).click()
        _wait_for_text(page, "#sae-summary", f"Feature {feature} at")
        page.wait_for_function(f"document.querySelector('#sae-image img').getAttribute('src') !== {before!r}",
                               timeout=30_000)
        grid_map = grid.feature_map(feature)
        expected_picture = blend(image, overlay(grid_map, layout, vmin=0.0, vmax=max(float(grid_map.max()), 1e-6)))
        np.testing.assert_array_equal(_shown_image(page, "#sae-image"), np.asarray(expected_picture))
        cells = load_top_cells(bundle)
        values = [float(v) for v, i in zip(cells["value"][feature], cells["image"][feature]) if i >= 0][:8]
        page.wait_for_function(f"document.querySelectorAll('#sae-patches img').length === {len(values)}",
                               timeout=30_000)
        captions = page.locator("#sae-patches").inner_text()
        assert all(f"{value:.2f}" in captions for value in values)
        page.screenshot(path=str(ARTIFACTS / f"sae-feature-{name}.png"), full_page=True)

        # zero it (the slider's default), then scale it: the answers are the library's steered answers, and the
        # answer word's attention and TAM maps before and after are the library's maps of the two traces
        clean = generate_with_capture(loaded, [image], PROMPT, options)
        for scale in (0.0, 6.0):
            if scale:
                slider = page.locator("#sae-scale input[type=number]")
                slider.fill(str(scale))
                slider.press("Enter")
                page.wait_for_function(f"Number(document.querySelector('#sae-scale input[type=range]').value) "
                                       f"=== {scale}", timeout=10_000)
            page.locator("#sae-steer").click()
            _wait_for_text(page, "#sae-steered", f"Feature {feature} x {scale:g}:")
            steered = generate_with_feature_edits(loaded, bundle, image, PROMPT, {feature: scale}, options)
            assert page.locator("#sae-steered strong").inner_text() == steered.answer
            page.wait_for_function(f"[...document.querySelectorAll('#sae-steered-maps img')].length === 4 && "
                                   f"document.querySelector('#sae-steered-maps').innerText.includes("
                                   f"{'after: ' + steered.answer_texts[0].strip()!r})", timeout=30_000)
            before, after = (get_method("attention").explain(trace, 0, model=loaded).maps[0]
                             for trace in (clean, steered))
            top = max(float(before.max()), float(after.max()), 1e-6)
            tiles = page.locator("#sae-steered-maps img")
            for slot, grid in ((0, before), (1, after)):
                src = tiles.nth(slot).get_attribute("src")
                shown = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]) if src.startswith("data:")
                                              else page.request.get(src).body()))
                expected = blend(image, overlay(grid, layout, vmin=0.0, vmax=top))
                np.testing.assert_array_equal(np.asarray(shown.convert("RGB")), np.asarray(expected))
        assert page.get_by_text("Error").count() == 0
        browser.close()


def test_features_tab_shows_the_librarys_features_maps_and_steered_answers(demo_app_url, library, tmp_path):
    _check_features_tab(demo_app_url, library, tmp_path, "in-process")


def test_features_tab_over_the_http_backend(demo_backend_app_url, library, tmp_path):
    _check_features_tab(demo_backend_app_url, library, tmp_path, "backend")
