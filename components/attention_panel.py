"""Attention panel: the selected token's raw attention over the image, with layer / head / aggregation controls,
an interactive heatmap, the clickable layer x head overview and the reverse view (click image cells)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lvlm_interpret import ExplainBackend, UserInputError
from lvlm_interpret.rendering import (
    captioned_map, cell_at, colour_bar, display_width, grid_picture, map_caption, plotly_heatmap, token_word,
)

ALL = "all"
OVERVIEW_CELL_PX = 32
# the overview's grid starts after the layer labels (left) and the head labels (top)
OVERVIEW_LEFT_PX, OVERVIEW_TOP_PX = 64, 40


@dataclass
class AttentionPanel:
    layer: gr.Dropdown
    head: gr.Dropdown
    aggregation: gr.Radio
    ignore_top: gr.Slider
    image: gr.Image
    heatmap: gr.Plot
    overview: gr.Image
    reverse: gr.HighlightedText

    @classmethod
    def build(cls) -> "AttentionPanel":
        with gr.Column():
            with gr.Row():
                layer = gr.Dropdown([ALL], value=ALL, label="Layer", elem_id="layer")
                head = gr.Dropdown([ALL], value=ALL, label="Head", elem_id="head")
                aggregation = gr.Radio(["mean", "max"], value="mean", label="Aggregation", elem_id="aggregation")
            ignore_top = gr.Slider(0, 10, value=0, step=1, label="Ignore the top N cells in the colour scale "
                                                                  "(attention sinks)")
            image = gr.Image(type="pil", label="Attention (click a cell for the reverse view)", interactive=False,
                             height=320, format="png", elem_id="attention-map")
            reverse = gr.HighlightedText(label="Reverse view: attention of every answer token to the clicked cell",
                                         show_legend=False, interactive=False, elem_id="reverse-view")
            with gr.Accordion("Interactive heatmap (hover for cell and value)", open=False):
                heatmap = gr.Plot(elem_id="attention-heatmap")
            gr.Markdown("**Layer x head overview**: the share of the token's attention that lands on the image, "
                        "per layer (rows) and head (columns); click a cell to show that layer and head.")
            overview = gr.Image(type="pil", show_label=False, interactive=False, format="png",
                                elem_id="attention-overview")
        return cls(layer, head, aggregation, ignore_top, image, heatmap, overview, reverse)

    def controls(self) -> list:
        return [self.layer, self.head, self.aggregation, self.ignore_top]

    def views(self) -> list:
        return [self.image, self.heatmap, self.overview]


def control_choices(n_layers: int, n_heads: int) -> tuple[gr.Dropdown, gr.Dropdown]:
    return (gr.Dropdown(choices=[ALL, *map(str, range(n_layers))], value=ALL),
            gr.Dropdown(choices=[ALL, *map(str, range(n_heads))], value=ALL))


def attention_options(layer: str = ALL, head: str = ALL, aggregation: str = "mean") -> dict:
    """The attention method's options as the panel sets them; only what differs from the defaults, so the page
    shares cached maps with every other caller."""
    chosen = {"layers": layer, "heads": head, "aggregation": aggregation}
    defaults = {"layers": ALL, "heads": ALL, "aggregation": "mean"}
    return {name: value for name, value in chosen.items() if value != defaults[name]}


def render_attention(service: ExplainBackend, request_id: str, image: Image.Image, token_index: int,
                     layer: str = ALL, head: str = ALL, aggregation: str = "mean", ignore_top: int = 0) -> Image.Image:
    """The token's attention blended over the original image (first image of the request) at `display_width`,
    with its colour bar and a caption; the image's pixels stay at the top left (clicks map back by the scale)."""
    explanation = service.explain(request_id, "attention", token_index, layers=layer, heads=head,
                                  aggregation=aggregation)
    trace = service.trace(request_id)
    caption = map_caption(trace.answer_texts[token_index], "attention", explanation.details) + \
        f" · read at position {trace.source_position(token_index)}, which predicts the word"
    return captioned_map(image, explanation.maps[0], trace.images[0], caption, ignore_top=int(ignore_top),
                         width=display_width(image))


def render_views(service: ExplainBackend, request_id: str, image: Image.Image, token_index: int, layer=ALL, head=ALL,
                 aggregation="mean", ignore_top=0) -> tuple:
    """(overlay picture, interactive heatmap, layer x head overview picture) for one token."""
    picture = render_attention(service, request_id, image, token_index, layer, head, aggregation, ignore_top)
    grid = service.explain(request_id, "attention", token_index, layers=layer, heads=head,
                           aggregation=aggregation).maps[0]
    trace = service.trace(request_id)
    word = token_word(trace.answer_texts[token_index])
    figure = plotly_heatmap(image, grid, trace.images[0], title=f"{word}: attention, layers {layer}, heads {head}, "
                                                                 f"{aggregation}")
    overview = overview_picture(service.attention_overview(request_id, token_index)["image"], layer, head)
    return picture, figure, overview


def overview_picture(mass: np.ndarray, layer: str = ALL, head: str = ALL) -> Image.Image:
    """The [layers, heads] attention mass as cells with their axes, the chosen layer / head outlined and a colour
    bar from 0 to the largest share."""
    n_layers, n_heads = mass.shape
    grid = grid_picture(mass, OVERVIEW_CELL_PX)
    bar = colour_bar(grid.height, 14)
    picture = Image.new("RGB", (OVERVIEW_LEFT_PX + grid.width + 80, OVERVIEW_TOP_PX + grid.height + 8), "white")
    picture.paste(grid, (OVERVIEW_LEFT_PX, OVERVIEW_TOP_PX))
    picture.paste(bar, (OVERVIEW_LEFT_PX + grid.width + 12, OVERVIEW_TOP_PX))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=12)
    draw.text((OVERVIEW_LEFT_PX, 4), "head", fill="black", font=font)
    draw.text((4, OVERVIEW_TOP_PX - 16), "layer", fill="black", font=font)
    for h in range(n_heads):
        draw.text((OVERVIEW_LEFT_PX + h * OVERVIEW_CELL_PX + OVERVIEW_CELL_PX // 2, OVERVIEW_TOP_PX - 4), str(h),
                  fill="black", font=font, anchor="mb")
    for row in range(n_layers):
        row_middle = OVERVIEW_TOP_PX + row * OVERVIEW_CELL_PX + OVERVIEW_CELL_PX // 2
        draw.text((OVERVIEW_LEFT_PX - 6, row_middle), str(row), fill="black", font=font, anchor="rm")
    bar_x = OVERVIEW_LEFT_PX + grid.width + 30
    draw.text((bar_x, OVERVIEW_TOP_PX), f"{float(mass.max()):.2f}", fill="black", font=font, anchor="lt")
    draw.text((bar_x, OVERVIEW_TOP_PX + grid.height), "0", fill="black", font=font, anchor="lb")
    layers = range(n_layers) if layer == ALL else [int(layer)]
    heads = range(n_heads) if head == ALL else [int(head)]
    if layer != ALL or head != ALL:  # outline what the views show
        left, top = OVERVIEW_LEFT_PX + min(heads) * OVERVIEW_CELL_PX, OVERVIEW_TOP_PX + min(layers) * OVERVIEW_CELL_PX
        draw.rectangle((left, top, left + len(heads) * OVERVIEW_CELL_PX - 1, top + len(layers) * OVERVIEW_CELL_PX - 1),
                       outline="#22d3ee", width=3)
    return picture


def overview_selection(x: int, y: int, n_layers: int, n_heads: int) -> tuple[str, str]:
    """The (layer, head) of a click at pixel (x, y) of the overview picture."""
    layer, head = (y - OVERVIEW_TOP_PX) // OVERVIEW_CELL_PX, (x - OVERVIEW_LEFT_PX) // OVERVIEW_CELL_PX
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise UserInputError("click inside the layer x head grid")
    return str(layer), str(head)


def reverse_view(service: ExplainBackend, request_id: str, x: float, y: float, layer=ALL, head=ALL,
                 aggregation="mean", scale: float = 1.0) -> list[tuple[str, float]]:
    """Answer tokens scored by their attention to the image cell under pixel (x, y) of the shown figure (the image
    at `scale` times its size), scaled to [0, 1]."""
    trace = service.trace(request_id)
    cell = cell_at(trace.images[0], x / scale, y / scale)
    if cell is None:
        raise UserInputError("that point is outside the part of the image the model sees")
    scores = service.reverse_attention(request_id, [cell], layer, head, aggregation)
    top = float(np.max(scores)) or 1.0
    return [(text, round(float(score) / top, 4)) for text, score in zip(trace.answer_texts, scores)]
