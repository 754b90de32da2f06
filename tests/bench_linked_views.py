"""How fast the linked views answer in Chromium (figures, not a test): hover -> every linked view redrawn; click ->
the token pinned with every cheap view drawn; click -> a costly map (relevancy, CLEANN) fetched, computed and drawn,
against its computation time; and, for reference, click -> the server-side panels of the other tabs updated. Run
`python -m tests.bench_linked_views [--model demo] [--backend] [--rounds 3] [--costly relevancy,cleann]`;
`--backend` puts the model behind `python -m lvlm_interpret serve` and the page on `app.py --backend URL`."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

from lvlm_interpret.demo.scenes import DESCRIBE_PROMPT, draw_scene
from tests.test_browser import CHROMIUM, FLAGS, _free_port, _start

# one hover in the page: the synchronous redraw, then the next frame (when the browser paints it)
HOVER = """async (index) => {
  const span = document.querySelectorAll('#linked-views .lv-token')[index];
  const start = performance.now();
  span.dispatchEvent(new MouseEvent('mouseenter'));
  const redrawn = performance.now() - start;
  await new Promise((resolve) => requestAnimationFrame(() => resolve()));
  return [redrawn, performance.now() - start];
}"""


# one click in the page: the pin and every cheap view drawn synchronously, then the next frame
CLICK = """async (index) => {
  const span = document.querySelectorAll('#linked-views .lv-token')[index];
  const start = performance.now();
  span.click();
  const pinned = performance.now() - start;
  await new Promise((resolve) => requestAnimationFrame(() => resolve()));
  return [pinned, performance.now() - start];
}"""

# one click with a costly map shown: until the frame that paints the token's map in the second view (the first
# animation frame that finds it drawn; the paint follows its callbacks); with the seconds the server took to compute
# it and the whole fetch from the page's costly-map route
COSTLY_CLICK = """async (index) => {
  const span = document.querySelectorAll('#linked-views .lv-token')[index];
  const canvas = document.querySelectorAll('#linked-views canvas.lv-map')[1];
  const start = performance.now();
  span.click();
  do {
    if (performance.now() - start > 120000) {
      throw new Error(`token ${index}: ${canvas.dataset.map} ${canvas.dataset.token} ${canvas.dataset.state}, ` +
        document.querySelectorAll('#linked-views .lv-progress')[1].textContent);
    }
    await new Promise((resolve) => requestAnimationFrame(() => resolve()));
  } while (!(canvas.dataset.state === 'drawn' && canvas.dataset.token === String(index)));
  return [performance.now() - start, Number(canvas.dataset.seconds) * 1000, Number(canvas.dataset.fetchMs)];
}"""
PANELS_CHANGED = "document.querySelector('#attention-map img')?.getAttribute('src') !== {!r}"
# the page's main thread idle again (Gradio has drawn the other tabs' figures), as when a reader clicks the next word
SETTLED = "() => new Promise((resolve) => requestIdleCallback(() => resolve(), { timeout: 5000 }))"


def _servers(model: str, backend: bool) -> tuple[str, list]:
    app_port = _free_port()
    url = f"http://127.0.0.1:{app_port}"
    if not backend:
        return url, [_start([sys.executable, "app.py", "--model", model, "--port", str(app_port), "--device", "cpu"],
                            url)]
    api_port = _free_port()
    api = _start([sys.executable, "-m", "lvlm_interpret", "serve", "--model", model, "--port", str(api_port),
                  "--device", "cpu"], f"http://127.0.0.1:{api_port}/v1/health")
    return url, [_start([sys.executable, "app.py", "--backend", f"http://127.0.0.1:{api_port}", "--port",
                         str(app_port)], url), api]


def _summary(name: str, values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"{name}: median {statistics.median(values):.2f} ms, p95 {p95:.2f} ms (n={len(values)})"


def _after_click(page, before: str) -> None:
    """Wait until the server-side panels answered the click and the page drew them (so the next click starts on an
    idle server and an idle page: a response that came while the page was drawing waited up to 100 ms for it)."""
    page.wait_for_function(PANELS_CHANGED.format(before), timeout=120_000, polling=5)
    page.evaluate(SETTLED)


def measure(url: str, rounds: int, costly: list[str]) -> list[str]:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
        path = f"{folder}/scene.png"
        draw_scene(seed=1, n_objects=3).image.save(path)
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.locator("#input-image input[type=file]").set_input_files(path)
        page.locator("#prompt textarea").fill(DESCRIBE_PROMPT)
        page.locator("#generate").click()
        page.get_by_role("tab", name="Linked views").click()
        tokens = page.locator("#linked-views .lv-token")
        tokens.first.wait_for(timeout=120_000)
        count = tokens.count()
        redraws, frames = [], []
        for _ in range(rounds):
            for index in range(count):
                redrawn, framed = page.evaluate(HOVER, index)
                redraws.append(redrawn)
                frames.append(framed)
        pins, pin_frames, panels = [], [], []
        for round_index in range(rounds):
            for index in range(count):
                if index == 0 and round_index == 0:
                    continue  # token 0 is pinned already
                before = page.locator("#attention-map img").get_attribute("src")
                start = time.perf_counter()
                pinned, framed = page.evaluate(CLICK, index)
                pins.append(pinned)
                pin_frames.append(framed)
                _after_click(page, before)
                panels.append((time.perf_counter() - start) * 1000)
        lines = [f"{count} answer tokens",
                 _summary("hover -> linked views redrawn (in-page)", redraws),
                 _summary("hover -> next frame painted", frames),
                 _summary("click -> token pinned, every cheap linked view redrawn (in-page)", pins),
                 _summary("click -> every cheap linked view in the next frame painted", pin_frames)]
        for method in costly:
            # shown as the second view: fetched for the pinned token (0) at once, then on every pin
            page.locator("#linked-views .lv-second").select_option(method)
            page.wait_for_function("document.querySelectorAll('#linked-views canvas.lv-map')[1].dataset.state"
                                   " === 'drawn'", timeout=120_000)
            page.wait_for_timeout(1000)  # the server panels' answer to the first fetch
            drawn, computed, fetches, revisits = [], [], [], []
            for index in range(1, count):
                before = page.locator("#attention-map img").get_attribute("src")
                elapsed, seconds, fetched = page.evaluate(COSTLY_CLICK, index)
                drawn.append(elapsed)
                computed.append(seconds)
                fetches.append(fetched)
                _after_click(page, before)
            for index in range(1, count):  # kept in the page: back to a token is a cheap redraw
                before = page.locator("#attention-map img").get_attribute("src")
                revisits.append(page.evaluate(COSTLY_CLICK, index)[0])
                _after_click(page, before)
            overheads = [total - compute for total, compute in zip(drawn, computed)]
            lines += [_summary(f"click -> {method} map computed and drawn (next frame)", drawn),
                      _summary(f"  of which {method}'s computation on the server", computed),
                      _summary("  of which the route's round trip (the computation included)", fetches),
                      _summary("  the rest (round trip, encoding, drawing)", overheads),
                      _summary(f"click back to a token -> its {method} map from the page (next frame)", revisits)]
        lines.append(_summary("click -> server panels of the other tabs updated (attention, method: one answer; "
                              "from the click, waited for between clicks)", panels))
        browser.close()
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--backend", action="store_true", help="model behind the HTTP backend")
    parser.add_argument("--rounds", type=int, default=3, help="passes over every answer token")
    parser.add_argument("--costly", default="relevancy,cleann", help="costly methods to time, comma-separated")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    url, processes = _servers(args.model, args.backend)
    try:
        lines = measure(url, args.rounds, [name for name in args.costly.split(",") if name])
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()} ({platform.processor() or 'cpu'}), "
          f"model {args.model}, {'backend' if args.backend else 'in-process'} mode, load average before "
          f"{load[0]:.1f}")
    for line in lines:
        print("- " + line)


if __name__ == "__main__":
    main()
