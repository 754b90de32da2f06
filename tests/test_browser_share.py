"""Share links in a real browser (Debian's Chromium via Playwright): a link opened in a fresh browser context shows
the same answer, word, tab and maps as the page that shared it; an expired link says so in the page."""

import os
import sys

import numpy as np
import pytest

from tests.conftest import make_scene
from tests.test_browser import ARTIFACTS, CHROMIUM, FLAGS, _free_port, _generate, _shown_image, _start

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="Debian chromium is not installed (make test installs it)")


def _app(extra: list[str]):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start([sys.executable, "app.py", "--model", "random:llava", "--port", str(port), "--device", "cpu",
                      *extra], url)
    return url, process


@pytest.fixture
def app_with_lifetime(request):
    """The page on random:llava, its share links living `request.param` hours (None: no expiry)."""
    url, process = _app([] if request.param is None else ["--share-link-hours", str(request.param)])
    yield url
    process.terminate()
    process.wait(timeout=30)


def _share(page) -> str:
    """Press Share and read the link it gives."""
    page.locator("#share").click()
    page.wait_for_function("document.querySelector('#share-link textarea, #share-link input').value"
                           ".startsWith('http')", timeout=30_000)
    return page.locator("#share-link textarea, #share-link input").first.input_value()


def _shared_page(browser, link: str):
    """A colleague's browser: a fresh context (no cookies, no storage, no session) opening the link."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(link)
    return page


@pytest.mark.parametrize("app_with_lifetime", [None], indirect=True)
def test_a_shared_link_shows_the_same_answer_word_tab_and_maps(app_with_lifetime, tmp_path):
    from playwright.sync_api import sync_playwright

    path = tmp_path / "scene.png"
    make_scene(160, 96).save(path)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _generate(page, app_with_lifetime, path)
        answer = page.locator("#answer textarea").input_value()
        before = page.locator("#attention-map img").get_attribute("src")
        page.locator("#answer-tokens .token").nth(2).click()
        page.wait_for_function(
            f"document.querySelector('#attention-map img').getAttribute('src') !== {before!r}", timeout=30_000)
        attention = _shown_image(page, "#attention-map")
        page.get_by_role("tab", name="Methods").click()
        page.wait_for_function("document.querySelector('#method-map img') !== null", timeout=30_000)
        method = _shown_image(page, "#method-map")
        link = _share(page)
        assert "share=" in link and "Describe" not in link and "token=2" in link and "tab=methods" in link
        page.screenshot(path=str(ARTIFACTS / "share-made.png"), full_page=True)

        shared = _shared_page(browser, link)
        shared.wait_for_function(f"document.querySelector('#answer textarea')?.value === {answer!r}",
                                 timeout=60_000)
        # it opens on the methods tab, at word 2, with the same map
        shared.wait_for_function("document.querySelector('#method-map img') !== null", timeout=30_000)
        np.testing.assert_array_equal(_shown_image(shared, "#method-map"), method)
        tokens = shared.locator("#answer-tokens .token")
        classes = [tokens.nth(k).get_attribute("class") or "" for k in range(tokens.count())]
        assert [k for k, c in enumerate(classes) if "highlighted" in c] == [2]
        assert shared.locator("#prompt textarea").input_value() == "Describe the image."
        shared.wait_for_function("document.querySelector('#request-status').innerText.includes('answer token 2')",
                                 timeout=30_000)
        shared.screenshot(path=str(ARTIFACTS / "share-opened.png"), full_page=True)
        shared.get_by_role("tab", name="Attention").click()
        shared.wait_for_function("document.querySelector('#attention-map img') !== null", timeout=30_000)
        np.testing.assert_array_equal(_shown_image(shared, "#attention-map"), attention)
        assert shared.get_by_text("Error").count() == 0
        browser.close()


@pytest.mark.parametrize("app_with_lifetime", [0.0005], indirect=True)  # links live 1.8 s
def test_an_expired_link_says_so_in_the_page(app_with_lifetime, tmp_path):
    from playwright.sync_api import sync_playwright

    path = tmp_path / "scene.png"
    make_scene(160, 96).save(path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _generate(page, app_with_lifetime, path)
        link = _share(page)
        page.wait_for_timeout(2500)  # past the link's lifetime
        shared = _shared_page(browser, link)
        notice = shared.get_by_text("this shared link expired on").first
        notice.wait_for(timeout=60_000)
        assert "(links here last 0.0005 h): ask whoever sent it for a new link" in notice.inner_text()
        assert shared.locator("#answer textarea").input_value() == ""
        shared.screenshot(path=str(ARTIFACTS / "share-expired.png"), full_page=True)
        browser.close()
