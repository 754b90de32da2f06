"""Side by side: the selected token's maps from every method (but the slow ones, iGOS++: the method panel has them),
at one size, each captioned with its colour bar."""

from __future__ import annotations

import gradio as gr
from PIL import Image

from lvlm_interpret import ExplainBackend
from lvlm_interpret.methods.base import quick_methods
from lvlm_interpret.rendering import BACKGROUND, MIN_DISPLAY_WIDTH, captioned_map, map_caption

# Tiles are rendered at the image's own width, at least this wide, so captions read and the enlarged preview is
# sharp; the gallery shows them at most this wide.
TILE_WIDTH = 480
# The galleries of map figures (this one and the Compare tab's, class "map-tiles"): each figure whole at its own
# aspect ratio (Gradio fits thumbnails into squares, which shrank them to a third of a 1400-pixel window), in columns
# at least MIN_DISPLAY_WIDTH wide, as many to a row as fit, the others wrapping; the page scrolls, not a box of half
# its height (where a tall image's tile did not fit, its caption out of sight); the gallery's label above the first
# tile, not over it.
TILES_CSS = (".map-tiles .grid-wrap { max-height: none !important; min-height: 0 !important; "
             "overflow-y: visible !important; }\n"
             f".map-tiles .grid-container {{ grid-template-columns: repeat(auto-fill, minmax({MIN_DISPLAY_WIDTH}px, "
             f"{TILE_WIDTH}px)) !important; grid-template-rows: none !important; grid-auto-rows: auto !important; "
             "padding-top: var(--size-10) !important; }\n"
             ".map-tiles .grid-container .thumbnail-item { aspect-ratio: auto !important; height: auto !important; }\n"
             ".map-tiles .grid-container .thumbnail-lg > img { height: auto !important; }")


def build() -> gr.Gallery:
    # captions are drawn inside the tiles: the gallery's own caption labels would cover the maps; PNG keeps the
    # text and the cells sharp (the default WebP blurs them)
    return gr.Gallery(label="All methods for the selected token", height="auto", object_fit="contain",
                      format="png", elem_id="comparison", elem_classes="map-tiles")


def comparison_tiles(service: ExplainBackend, request_id: str, image: Image.Image, token_index: int,
                     methods: list[str] | None = None, options: dict[str, dict] | None = None,
                     layer: str = "all", head: str = "all", aggregation: str = "mean",
                     ignore_top: int = 0) -> dict[str, Image.Image]:
    """Every map of every method by name, each a captioned figure with its colour bar, all one size; `options`
    per method as the method panel set them; attention for the attention panel's `layer`, `head`, `aggregation`
    and `ignore_top`."""
    trace = service.trace(request_id)
    layout, word = trace.images[0], trace.answer_texts[token_index]
    options = {**(options or {}), "attention": {"layers": layer, "heads": head, "aggregation": aggregation}}
    width = max(image.width, TILE_WIDTH)
    tiles = {}
    for method in methods or quick_methods():
        explanation = service.explain(request_id, method, token_index, **options.get(method, {}))
        for name, maps in explanation.all_maps().items():
            tiles[name] = captioned_map(image, maps[0], layout, map_caption(word, name, explanation.details),
                                        width=width, ignore_top=int(ignore_top) if method == "attention" else 0)
    # captions wrap to different numbers of lines: white below the shorter ones puts every tile at one size
    height = max(tile.height for tile in tiles.values())
    return {name: _padded(tile, height) for name, tile in tiles.items()}


def _padded(tile: Image.Image, height: int) -> Image.Image:
    padded = Image.new("RGB", (tile.width, height), BACKGROUND)
    padded.paste(tile, (0, 0))
    return padded


def render_comparison(service: ExplainBackend, request_id: str, image: Image.Image, token_index: int,
                      methods: list[str] | None = None, options: dict[str, dict] | None = None,
                      layer: str = "all", head: str = "all", aggregation: str = "mean",
                      ignore_top: int = 0) -> list[Image.Image]:
    """The gallery's value: `comparison_tiles` in order."""
    return list(comparison_tiles(service, request_id, image, token_index, methods, options, layer, head,
                                 aggregation, ignore_top).values())
