"""Linked views drawn in the browser: the cheap maps of every answer token (attention for the chosen layers / heads /
aggregation, TAM and its variants) travel to the page once per request, 8 bits per cell, and JavaScript redraws
every view on hover (tokens, or image cells for the reverse view) with no server round trip. A click pins a token
and fires the component's `select` event, so the server-side panels follow it."""

from __future__ import annotations

import base64
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from lvlm_interpret import ExplainBackend, TraceView
from lvlm_interpret.methods.base import image_token_positions
from lvlm_interpret.rendering import colour_lookup, png_data_uri

HERE = Path(__file__).resolve().parent
IMAGE_LONG_SIDE = 512  # the image travels downscaled; the maps are placed by the original size
LEVELS = 255


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
                  *(_map_record(name, name.replace("_", " "), grids) for name, grids in tam_maps.items())],
        "text": text_pattern(trace, [explanation.text_scores for explanation in explained]),
    }


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
    return gr.HTML(None, html_template='<div class="lv-root"></div>',
                   css_template=(HERE / "linked_views.css").read_text(),
                   js_on_load=(HERE / "linked_views.js").read_text(), elem_id="linked-views")
