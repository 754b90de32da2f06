"""Side by side: the selected token's maps from every method, at one size."""

from __future__ import annotations

import gradio as gr
from PIL import Image

from lvlm_interpret import METHODS, ExplainBackend
from lvlm_interpret.rendering import blend, overlay

TILE = 256


def build() -> gr.Gallery:
    return gr.Gallery(label="All methods for the selected token", columns=4, height="auto", object_fit="contain",
                      elem_id="comparison")


def render_comparison(service: ExplainBackend, request_id: str, image: Image.Image, token_index: int,
                      methods: list[str] | None = None, options: dict[str, dict] | None = None
                      ) -> list[tuple[Image.Image, str]]:
    """Every map of every method (`options`: per method, as the method panel set them)."""
    layout = service.trace(request_id).images[0]
    tiles = []
    for method in methods or sorted(METHODS):
        explanation = service.explain(request_id, method, token_index, **(options or {}).get(method, {}))
        for name, maps in explanation.all_maps().items():
            picture = blend(image, overlay(maps[0], layout))
            picture.thumbnail((TILE, TILE))
            tiles.append((picture, name))
    return tiles
