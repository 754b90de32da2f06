"""Attention panel: the selected token's raw attention over the image, with layer / head / aggregation controls."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
from PIL import Image

from lvlm_interpret import ExplainService
from lvlm_interpret.rendering import blend, overlay

ALL = "all"


@dataclass
class AttentionPanel:
    layer: gr.Dropdown
    head: gr.Dropdown
    aggregation: gr.Radio
    ignore_top: gr.Slider
    image: gr.Image

    @classmethod
    def build(cls) -> "AttentionPanel":
        with gr.Column():
            with gr.Row():
                layer = gr.Dropdown([ALL], value=ALL, label="Layer", elem_id="layer")
                head = gr.Dropdown([ALL], value=ALL, label="Head", elem_id="head")
                aggregation = gr.Radio(["mean", "max"], value="mean", label="Aggregation", elem_id="aggregation")
            ignore_top = gr.Slider(0, 10, value=0, step=1, label="Ignore the top N cells in the colour scale "
                                                                  "(attention sinks)")
            image = gr.Image(type="pil", label="Attention", interactive=False, height=320, format="png",
                             elem_id="attention-map")
        return cls(layer, head, aggregation, ignore_top, image)

    def controls(self) -> list:
        return [self.layer, self.head, self.aggregation, self.ignore_top]


def control_choices(n_layers: int, n_heads: int) -> tuple[gr.Dropdown, gr.Dropdown]:
    return (gr.Dropdown(choices=[ALL, *map(str, range(n_layers))], value=ALL),
            gr.Dropdown(choices=[ALL, *map(str, range(n_heads))], value=ALL))


def render_attention(service: ExplainService, request_id: str, image: Image.Image, token_index: int,
                     layer: str = ALL, head: str = ALL, aggregation: str = "mean", ignore_top: int = 0) -> Image.Image:
    """The token's attention blended over the original image (first image of the request)."""
    explanation = service.explain(request_id, "attention", token_index, layers=layer, heads=head,
                                  aggregation=aggregation)
    layout = service.trace(request_id).images[0]
    return blend(image, overlay(explanation.maps[0], layout, ignore_top=int(ignore_top)))
