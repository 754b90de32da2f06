"""Method panel: the selected token's map from any registered method (relevancy, TAM, CLEANN, ...), computed on
first view and cached by the service."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
from PIL import Image

from lvlm_interpret import METHODS, ExplainService
from lvlm_interpret.rendering import blend, overlay

OWN_PANEL = {"attention"}  # methods with a dedicated panel
FIRST = ("tam", "relevancy")  # quick ones first: the first is computed for every generation


def method_names() -> list[str]:
    others = sorted(set(METHODS) - OWN_PANEL - set(FIRST))
    return [name for name in FIRST if name in METHODS] + others


@dataclass
class MethodPanel:
    method: gr.Radio
    map_name: gr.Dropdown
    image: gr.Image
    summary: gr.Markdown

    @classmethod
    def build(cls) -> "MethodPanel":
        names = method_names()
        with gr.Column():
            with gr.Row():
                method = gr.Radio(names, value=names[0], label="Method", elem_id="method")
                map_name = gr.Dropdown([names[0]], value=names[0], label="Map", elem_id="map-name")
            image = gr.Image(type="pil", label="Explanation", interactive=False, height=320, format="png",
                             elem_id="method-map")
            summary = gr.Markdown(elem_id="method-summary")
        return cls(method, map_name, image, summary)


def summarise(explanation) -> str:
    details = explanation.details
    if explanation.method != "cleann":
        return ""
    verdict = "verified" if details["verified"] else "not reached: the whole neighbourhood is shown"
    return (f"**CLEANN** (layer {details['layer']}, head {details['head']}): {len(details['image_cells'])} image "
            f"cells, text positions {details['text_tokens']}; p(token) {details['prob_before']:.3f} -> "
            f"{details['prob_after']:.3f} when masked ({verdict}); {len(details['edges'])} graph edges.")


def render_method(service: ExplainService, request_id: str, image: Image.Image, token_index: int, method: str,
                  map_name: str | None = None) -> tuple[Image.Image, list[str], str, str]:
    """(blended picture, the method's map names, the map shown, a summary) for one token."""
    explanation = service.explain(request_id, method, token_index)
    maps = explanation.all_maps()
    shown = map_name if map_name in maps else method
    layout = service.trace(request_id).images[0]
    return blend(image, overlay(maps[shown][0], layout)), list(maps), shown, summarise(explanation)
