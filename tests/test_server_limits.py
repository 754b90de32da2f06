"""The hosted backend's limits over HTTP, as `python -m lvlm_interpret serve --hosted` applies them: uploads decoded
only once admitted and within a pixel and memory budget, a body without Content-Length capped while it streams, and
a per-client request rate."""

import contextlib
import io
import json
import os
import select
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import lvlm_interpret.server as server_module
from lvlm_interpret.loadtest import free_port
from lvlm_interpret.ratelimit import RateLimiter
from lvlm_interpret.server import serving_api
from lvlm_interpret.service import hosted_limits
from tests.conftest import make_scene
from tests.test_server import _png

# small budgets, so that a few uploads test them in seconds
LIMITS = {**hosted_limits(), "max_upload_mb": 1, "max_image_pixels": 2_000_000, "image_memory_mb": 64,
          "cache_mb": 16, "rate_limit_per_minute": 1000}
SERVE = """import pathlib, sys
import lvlm_interpret.service
lvlm_interpret.service.HOSTED_CONFIG = pathlib.Path(sys.argv[1])
from lvlm_interpret.cli import run
sys.argv = ["lvlm_interpret", "serve", "--hosted", "--device", "cpu", "--port", sys.argv[2]]
run()
"""


def _memory_kb(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture(scope="module")
def hosted_backend(tmp_path_factory):
    """`serve --hosted` in its own process (its memory measured alone) with LIMITS as configs/hosted.json."""
    config = tmp_path_factory.mktemp("config") / "hosted.json"
    config.write_text(json.dumps(LIMITS))
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SERVE, str(config), str(port)],
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                httpx.get(url + "/v1/health", timeout=5).raise_for_status()
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.time() > deadline:
                    raise AssertionError(process.stdout.read().decode()[-2000:]) from None
                time.sleep(0.3)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def _generate(url: str, png: bytes) -> httpx.Response:
    return httpx.post(url + "/v1/generate", files={"image": ("i.png", png, "image/png")},
                      data={"prompt": "What color is the circle?", "max_new_tokens": "4"}, timeout=120)


def test_concurrent_large_uploads_are_refused_before_decoding_and_memory_stays_bounded(hosted_backend):
    url, pid = hosted_backend
    assert _generate(url, _png(make_scene())).status_code == 200  # warm: the model has run once
    buffer = io.BytesIO()
    Image.new("RGB", (5000, 5000), (200, 30, 30)).save(buffer, format="PNG")
    huge = buffer.getvalue()  # 25 megapixels in about 80 KB
    within = _png(make_scene(1000, 800))  # 0.8 megapixels: under the pixel budget, decoded and answered
    assert len(huge) < 2 ** 20
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")  # the peak RSS starts again from the current RSS
    before_kb = _memory_kb(pid, "VmRSS")
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda png: _generate(url, png), [huge, within] * 3))
    grown_mb = (_memory_kb(pid, "VmHWM") - before_kb) / 1024

    refused, answered = responses[::2], responses[1::2]
    assert [r.status_code for r in refused] == [413] * 3
    assert {r.json()["error"] for r in refused} == {
        "the image is too large (5000x5000 pixels): upload one of at most 2 megapixels"}
    assert [r.status_code for r in answered] == [200] * 3
    # images in flight take at most image_memory_mb, cached traces at most cache_mb: decoding one 25-megapixel
    # upload alone would take over 250 MB
    assert grown_mb < LIMITS["image_memory_mb"] + LIMITS["cache_mb"], f"RSS grew by {grown_mb:.0f} MB"


def test_a_body_without_length_is_refused_once_it_passes_the_cap(hosted_backend):
    url, _ = hosted_backend
    cap = LIMITS["max_upload_mb"] * 2 ** 20
    chunk = b"x" * 2 ** 16
    planned = 256 * 2 ** 20
    sent = 0
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as connection:
        part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="i.png"\r\n\r\n'
        connection.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
                           b"Content-Type: multipart/form-data; boundary=b\r\n\r\n%x\r\n%s\r\n" % (len(part), part))
        try:
            while sent < planned and not select.select([connection], [], [], 0)[0]:
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while this side was still writing
        answer = b""
        with contextlib.suppress(ConnectionResetError):  # the answer, then the reset of the closed connection
            while received := connection.recv(65536):
                answer += received
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body) == {"error": "the upload is larger than 1 MB: upload a smaller file"}
    # answered while the body streamed, after little more than the cap (the rest is in socket buffers at most)
    assert sent < cap + 32 * 2 ** 20, f"{sent / 2 ** 20:.0f} MB sent before the answer"


@pytest.fixture
def rate_limited(monkeypatch):
    """The hosted backend with 3 requests a minute per client."""
    monkeypatch.setattr(server_module, "hosted_limits", lambda: {**LIMITS, "rate_limit_per_minute": 3})
    return serving_api("demo", device="cpu", hosted=True)


def test_a_client_over_the_rate_limit_gets_429_with_retry_after(rate_limited):
    client = TestClient(rate_limited, client=("203.0.113.7", 50000))
    assert [client.get("/v1/methods").status_code for _ in range(3)] == [200] * 3
    refused = client.post("/v1/explain", json={"request_id": "x", "method": "tam", "token_index": 0})
    retry_after = int(refused.headers["Retry-After"])
    assert refused.status_code == 429 and 1 <= retry_after <= 20  # a request every 20 s once the 3 are spent
    assert refused.json() == {
        "error": f"too many requests from your address (at most 3 a minute): retry in {retry_after} s"}
    assert client.get("/v1/health").status_code == 200  # liveness is never limited
    other = TestClient(rate_limited, client=("198.51.100.2", 50000))
    assert other.get("/v1/methods").status_code == 200  # each address has its own limit


def test_the_rate_limiter_refills_forgets_idle_clients_and_stays_bounded():
    now = [0.0]
    limiter = RateLimiter(3, clock=lambda: now[0], max_clients=2)
    assert [limiter.retry_after("a") for _ in range(4)] == [None, None, None, 20]
    now[0] = 10.0
    assert limiter.retry_after("a") == 10  # the refused request did not count
    now[0] = 20.0
    assert limiter.retry_after("a") is None and limiter.retry_after("a") == 20
    for client in "bcd":
        limiter.retry_after(client)
    assert len(limiter._buckets) == 2  # the least recently seen client ("a") was forgotten first
    now[0] = 100.0
    limiter.retry_after("e")
    assert list(limiter._buckets) == ["e"]  # clients idle for a minute are forgotten
