"""Attention panel: the selected token's raw attention over the image, with layer / head / aggregation controls,
an interactive heatmap, the clickable layer x head overview and the reverse view (click image cells)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
from PIL import Image

from lvlm_interpret import ExplainBackend, UserInputError
from lvlm_interpret.rendering import blend, cell_at, grid_picture, overlay, plotly_heatmap

ALL = "all"
OVERVIEW_CELL_PX = 24


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
            overview = gr.Image(type="pil", label="Layer x head attention mass on the image (rows: layers, "
                                                  "columns: heads; click to select)", interactive=False,
                                format="png", elem_id="attention-overview")
        return cls(layer, head, aggregation, ignore_top, image, heatmap, overview, reverse)

    def controls(self) -> list:
        return [self.layer, self.head, self.aggregation, self.ignore_top]

    def views(self) -> list:
        return [self.image, self.heatmap, self.overview]


def control_choices(n_layers: int, n_heads: int) -> tuple[gr.Dropdown, gr.Dropdown]:
    return (gr.Dropdown(choices=[ALL, *map(str, range(n_layers))], value=ALL),
            gr.Dropdown(choices=[ALL, *map(str, range(n_heads))], value=ALL))


def render_attention(service: ExplainBackend, request_id: str, image: Image.Image, token_index: int,
                     layer: str = ALL, head: str = ALL, aggregation: str = "mean", ignore_top: int = 0) -> Image.Image:
    """The token's attention blended over the original image (first image of the request)."""
    explanation = service.explain(request_id, "attention", token_index, layers=layer, heads=head,
                                  aggregation=aggregation)
    layout = service.trace(request_id).images[0]
    return blend(image, overlay(explanation.maps[0], layout, ignore_top=int(ignore_top)))


def render_views(service: ExplainBackend, request_id: str, image: Image.Image, token_index: int, layer=ALL, head=ALL,
                 aggregation="mean", ignore_top=0) -> tuple:
    """(overlay picture, interactive heatmap, layer x head overview picture) for one token."""
    picture = render_attention(service, request_id, image, token_index, layer, head, aggregation, ignore_top)
    grid = service.explain(request_id, "attention", token_index, layers=layer, heads=head,
                           aggregation=aggregation).maps[0]
    layout = service.trace(request_id).images[0]
    figure = plotly_heatmap(image, grid, layout, title=f"token {token_index}, layer {layer}, head {head}")
    overview = grid_picture(service.attention_overview(request_id, token_index)["image"], OVERVIEW_CELL_PX)
    return picture, figure, overview


def overview_selection(x: int, y: int, n_layers: int, n_heads: int) -> tuple[str, str]:
    """The (layer, head) of a click at pixel (x, y) of the overview picture."""
    layer, head = y // OVERVIEW_CELL_PX, x // OVERVIEW_CELL_PX
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise UserInputError("click inside the layer x head grid")
    return str(layer), str(head)


def reverse_view(service: ExplainBackend, request_id: str, x: float, y: float, layer=ALL, head=ALL,
                 aggregation="mean") -> list[tuple[str, float]]:
    """Answer tokens scored by their attention to the image cell under pixel (x, y), scaled to [0, 1]."""
    trace = service.trace(request_id)
    cell = cell_at(trace.images[0], x, y)
    if cell is None:
        raise UserInputError("that point is outside the part of the image the model sees")
    scores = service.reverse_attention(request_id, [cell], layer, head, aggregation)
    top = float(np.max(scores)) or 1.0
    return [(text, round(float(score) / top, 4)) for text, score in zip(trace.answer_texts, scores)]
