"""How fast the linked views answer in Chromium (figures, not a test): hover -> every linked view redrawn, and click ->
the token pinned in the page and the server-side panels updated. Run
`python -m tests.bench_linked_views [--model demo] [--backend] [--rounds 3]`; `--backend` puts the model behind
`python -m lvlm_interpret serve` and the page on `app.py --backend URL`."""

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


def measure(url: str, rounds: int) -> list[str]:
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
        pins, panels = [], []
        changed = "document.querySelector('#attention-map img')?.getAttribute('src') !== {!r}"
        for round_index in range(rounds):
            for index in range(count):
                if index == 0 and round_index == 0:
                    continue  # token 0 is pinned already
                before = page.locator("#attention-map img").get_attribute("src")
                start = time.perf_counter()
                tokens.nth(index).click()
                pins.append(page.evaluate("Number(document.querySelector('#linked-views canvas.lv-map')"
                                          ".dataset.drawnMs)"))
                page.wait_for_function(changed.format(before), timeout=60_000, polling=5)
                panels.append((time.perf_counter() - start) * 1000)
        browser.close()
    return [f"{count} answer tokens",
            _summary("hover -> linked views redrawn (in-page)", redraws),
            _summary("hover -> next frame painted", frames),
            _summary("click -> linked views pinned (in-page redraw)", pins),
            _summary("click -> server panels updated (attention, method, side by side: one answer; "
                     "from the Playwright click)", panels)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--backend", action="store_true", help="model behind the HTTP backend")
    parser.add_argument("--rounds", type=int, default=3, help="passes over every answer token")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    url, processes = _servers(args.model, args.backend)
    try:
        lines = measure(url, args.rounds)
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
