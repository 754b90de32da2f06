"""Linked views drawn in the browser: the cheap maps of every answer token (attention for the chosen layers / heads /
aggregation, TAM and its variants) travel to the page once per request, 8 bits per cell, and JavaScript redraws
every view on hover (tokens, or image cells or a brushed region for the reverse view) with no server round trip. A
click pins a token at once in the page; a costly method's maps (relevancy, CLEANN, ...) are fetched for the pinned
token from a plain HTTP route of the page's own app (`COSTLY_ROUTE`, outside Gradio's session and event machinery)
and kept in the page. Then the component's `select` event fires, so the server-side panels follow. A click in the
answer strip pins the same token here (the `selected_token` prop)."""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path
from typing import Callable

import gradio as gr
import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from PIL import Image
from starlette.concurrency import run_in_threadpool

from lvlm_interpret import METHODS, ExplainBackend, TraceView, UserInputError
from lvlm_interpret.methods.base import image_token_positions
from lvlm_interpret.ratelimit import RateLimiter
from lvlm_interpret.rendering import colour_lookup, map_label, png_data_uri
from lvlm_interpret.server import refusal

from .method_panel import method_names

HERE = Path(__file__).resolve().parent
IMAGE_LONG_SIDE = 512  # the image travels downscaled; the maps are placed by the original size
LEVELS = 255
CHEAP = ("attention", "tam")  # in the payload for every token; every other method is fetched on pin
COSTLY_ROUTE = "/linked-views/costly-maps"  # on the page's own app; the script posts its queries there
log = logging.getLogger(__name__)


def costly_methods() -> list[str]:
    return [name for name in method_names() if name not in CHEAP]


def quantize(grid_map: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(uint8 cells, low, high): the map scaled from its own [low, high] to [0, 255]; undo with
    low + cells / 255 * (high - low) (within half a level)."""
    values = np.asarray(grid_map, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    span = high - low
    cells = np.zeros(values.shape, np.uint8) if span <= 0 else np.round((values - low) / span * LEVELS).astype(np.uint8)
    return cells, low, high


def dequantize(cells: np.ndarray, low: float, high: float) -> np.ndarray:
    return low + cells.astype(np.float32) / LEVELS * (high - low)


def _map_record(name: str, caption: str, grids: list[np.ndarray]) -> dict:
    """One view's maps for all tokens: cells base64 of uint8 [tokens, rows, cols], per-token low / high."""
    quantized = [quantize(grid) for grid in grids]
    cells = np.stack([cells for cells, _, _ in quantized])
    return {"name": name, "caption": caption, "cells": base64.b64encode(cells.tobytes()).decode(),
            "low": [low for _, low, _ in quantized], "high": [high for _, _, high in quantized]}


def _data_uri(image: Image.Image) -> str:
    small = image.convert("RGB")
    small.thumbnail((IMAGE_LONG_SIDE, IMAGE_LONG_SIDE), Image.Resampling.LANCZOS)
    return png_data_uri(small)


def attention_caption(layer, head, aggregation: str) -> str:
    return f"attention, layers {layer}, heads {head}, {aggregation}"


def payload(service: ExplainBackend, request_id: str, image: Image.Image, layer="all", head="all",
            aggregation: str = "mean") -> dict:
    """Everything the linked views draw for one request (JSON-able): the answer tokens, the first image and its
    grid, and for every token the attention map (chosen layers / heads / aggregation) and TAM's maps."""
    trace = service.trace(request_id)
    layout = trace.images[0]
    tokens = range(trace.n_answer)
    explained = [service.explain(request_id, "attention", t, layers=layer, heads=head, aggregation=aggregation)
                 for t in tokens]
    attention = [explanation.maps[0] for explanation in explained]
    tam_maps: dict[str, list[np.ndarray]] = {}
    for t in tokens:
        for name, grids in service.explain(request_id, "tam", t).all_maps().items():
            tam_maps.setdefault(name, []).append(grids[0])
    return {
        "request_id": request_id,
        "tokens": list(trace.answer_texts),
        "image": _data_uri(image),
        "image_size": list(layout.image_size),
        # the grid as rendering.map_on_image places it: the box rounded to whole pixels of the original image
        "grid": {"rows": layout.rows, "cols": layout.cols, "box": [int(round(v)) for v in layout.box]},
        "colours": base64.b64encode(colour_lookup().tobytes()).decode(),  # the server's 256 Inferno colours
        "views": [_map_record("attention", attention_caption(layer, head, aggregation), attention),
                  *(_map_record(name, map_label(name), grids) for name, grids in tam_maps.items())],
        # fetched for a pinned token on demand: (name, what it is)
        "costly": [{"name": name, "caption": map_label(name), "description": METHODS[name].description}
                   for name in costly_methods()],
        "text": text_pattern(trace, [explanation.text_scores for explanation in explained]),
    }


def costly_maps(service: ExplainBackend, query: dict) -> dict:
    """A costly method's maps (its own and its variants) of one token, as the payload's views of a single token,
    with the seconds its computation took (near 0 when the service had it cached). The request id is the key to the
    request, as for every handler of the page: the service answers for the requests it holds (else
    UnknownRequestError, "generate an answer first"); a bad query is a UserInputError saying what to send."""
    if not isinstance(query, dict) or query.get("method") not in costly_methods():
        raise UserInputError(f"the linked views fetch one of {', '.join(costly_methods())}")
    if not isinstance(query.get("token"), int) or isinstance(query["token"], bool):
        raise UserInputError("the linked views fetch a map for one answer token, by its index")
    token = query["token"]
    start = time.perf_counter()
    explanation = service.explain(str(query.get("request_id")), query["method"], token)
    seconds = time.perf_counter() - start
    return {"request_id": query["request_id"], "method": query["method"], "token": token, "seconds": seconds,
            "views": [_map_record(name, map_label(name), [grids[0]]) for name, grids in explanation.all_maps().items()]}


def costly_route(fetch: Callable[[dict], dict], rate_limiter: RateLimiter | None = None) -> APIRoute:
    """POST `COSTLY_ROUTE` with the query {request_id, method, token} as JSON: `fetch(query)` (`costly_maps` on the
    page's backend) as JSON, or {"error": one line} with 400 (bad query), 404 (unknown request), 429 over the hosted
    page's rate (`rate_limiter`, the limit of its other events; with Retry-After), 503 busy, 500. A route of the page's
    own FastAPI app, outside Gradio's sessions: a refusal has its HTTP status, and the script needs no Gradio client."""
    async def endpoint(request: Request) -> JSONResponse:
        if rate_limiter is not None:
            wait = rate_limiter.retry_after(request.client.host if request.client else "unknown")
            if wait is not None:
                return JSONResponse({"error": rate_limiter.message(wait)}, 429, headers={"Retry-After": str(wait)})
        try:
            query = await request.json()
        except ValueError:
            return JSONResponse({"error": "send the query as JSON: {request_id, method, token}"}, 400)
        try:
            return JSONResponse(await run_in_threadpool(fetch, query))
        except UserInputError as error:
            return refusal(error)
        except Exception:
            log.exception("the linked views' costly map failed")
            return JSONResponse({"error": "could not be computed (an internal error, logged on the server); "
                                          "try again"}, 500)

    return APIRoute(COSTLY_ROUTE, endpoint, methods=["POST"], include_in_schema=False)


def text_pattern(trace: TraceView, scores: list[np.ndarray]) -> dict:
    """Text-to-text attention, as CircuitsVis draws it: every text position of the sequence (prompt and answer, no
    image tokens) and, per answer token, its attention to each of them (8 bits, per-token low / high; positions at
    or after the token's own predicting position get none)."""
    image = image_token_positions(trace)
    positions = [p for p in range(len(trace.token_texts)) if p not in image and trace.token_texts[p].strip()]
    rows = np.zeros((len(scores), len(positions)), np.float32)
    for t, row in enumerate(scores):
        known = [k for k, p in enumerate(positions) if p < len(row)]
        rows[t, known] = row[[positions[k] for k in known]]
    record = _map_record("text", "attention to text", list(rows))
    return {"positions": positions, "texts": [trace.token_texts[p] for p in positions],
            "answer_start": trace.prompt_length, **record}


def build() -> gr.HTML:
    """The component; its script fetches costly maps from `COSTLY_ROUTE`, which the page's launch mounts
    (`costly_route`)."""
    return gr.HTML(None, html_template=f'<div class="lv-root" data-costly-route="{COSTLY_ROUTE.lstrip("/")}"></div>',
                   css_template=(HERE / "linked_views.css").read_text(),
                   js_on_load=(HERE / "linked_views.js").read_text(), elem_id="linked-views", selected_token=None)


def selected(state: dict, event: gr.SelectData) -> gr.HTML:
    """The token clicked in the answer strip, for the linked views to pin: {request_id, token}."""
    return gr.HTML(selected_token={"request_id": state["request_id"], "token": int(event.index)} if state else None)
