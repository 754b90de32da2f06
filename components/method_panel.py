"""Method panel: the selected token's map from any registered method (relevancy, TAM, CLEANN, ...), computed on
first view and cached by the service."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
from PIL import Image

from lvlm_interpret import METHODS, ExplainService
from lvlm_interpret.rendering import blend, overlay

from .figures import cleann_graph_figure, text_scores_figure

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
    text_scores: gr.Plot
    graph: gr.Plot

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
            text_scores = gr.Plot(label="Text scores", elem_id="method-text-scores")
            graph = gr.Plot(label="CLEANN graph", elem_id="cleann-graph")
        return cls(method, map_name, image, summary, text_scores, graph)

    def outputs(self) -> list:
        return [self.image, self.map_name, self.summary, self.text_scores, self.graph]


def summarise(explanation) -> str:
    details = explanation.details
    if explanation.method != "cleann":
        return ""
    verdict = "verified" if details["verified"] else "not reached: the whole neighbourhood is shown"
    other_views = "".join(f" (+{len(cells)} in the {name} view)" for name, cells in details["view_cells"].items())
    return (f"**CLEANN** (layer {details['layer']}, head {details['head']}): {len(details['image_cells'])} image "
            f"cells{other_views}, text positions {details['text_tokens']}; p(token) {details['prob_before']:.3f} -> "
            f"{details['prob_after']:.3f} when masked ({verdict}); {len(details['edges'])} graph edges.")


def render_method(service: ExplainService, request_id: str, image: Image.Image, token_index: int, method: str,
                  map_name: str | None = None) -> tuple:
    """(blended picture, the method's map names, the map shown, a summary, text-score bars, CLEANN graph)."""
    explanation = service.explain(request_id, method, token_index)
    maps = explanation.all_maps()
    shown = map_name if map_name in maps else method
    trace = service.trace(request_id)
    return (blend(image, overlay(maps[shown][0], trace.images[0])), list(maps), shown, summarise(explanation),
            text_scores_figure(trace, explanation), cleann_graph_figure(trace, explanation))
