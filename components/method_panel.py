"""Method panel: the selected token's map from any registered method (relevancy, TAM, CLEANN, iGOS++, ...),
computed on first view and cached by the service; a method with an answer-level map (iGOS++: the answer's visually
relevant tokens together) shows it until a token is picked; a slow one (iGOS++) shows its iterations on a progress bar
and stops at the next one when Cancel is pressed."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import gradio as gr
from PIL import Image

from lvlm_interpret import METHODS, ExplainBackend, TraceView, UserInputError
from lvlm_interpret.progress import reporting_progress
from lvlm_interpret.rendering import captioned_map, display_width, map_caption, map_label, token_word

from .figures import cleann_graph_figure, text_scores_figure

OWN_PANEL = {"attention"}  # methods with a dedicated panel
FIRST = ("tam", "relevancy")  # quick ones first: the first is computed for every generation
DEFAULT_LAYER, ALL_HEADS = "default", "all"  # the method's own default layer (the middle one), every head


def method_names() -> list[str]:
    others = sorted(set(METHODS) - OWN_PANEL - set(FIRST))
    return [name for name in FIRST if name in METHODS] + others


@dataclass
class MethodPanel:
    method: gr.Radio
    map_name: gr.Dropdown
    cleann_layer: gr.Dropdown
    cleann_head: gr.Dropdown
    relevancy_vision: gr.Checkbox
    image: gr.Image
    summary: gr.Markdown
    text_scores: gr.Plot
    graph: gr.Plot
    cancel: gr.Button

    @classmethod
    def build(cls) -> "MethodPanel":
        names = method_names()
        with gr.Column():
            with gr.Row():
                method = gr.Radio(names, value=names[0], label="Method", elem_id="method")
                map_name = gr.Dropdown([names[0]], value=names[0], label="Map", elem_id="map-name")
                # each method's own controls, shown while it is: CLEANN reads one layer's attention, each head or
                # a chosen one; relevancy may leave the vision tower out (its attention over many tiles is large)
                cleann_layer = gr.Dropdown([DEFAULT_LAYER], value=DEFAULT_LAYER, label="CLEANN layer", visible=False,
                                           elem_id="cleann-layer")
                cleann_head = gr.Dropdown([ALL_HEADS], value=ALL_HEADS, label="CLEANN head", visible=False,
                                          elem_id="cleann-head")
                relevancy_vision = gr.Checkbox(True, label="through the vision tower (vit, all)",
                                               visible=names[0] == "relevancy", elem_id="relevancy-vision")
            image = gr.Image(type="pil", label="Explanation", interactive=False, height=320, format="png",
                             elem_id="method-map")
            # under the map, where the progress bar of a slow method's iterations shows
            cancel = gr.Button("Cancel", size="sm", variant="stop", elem_id="method-cancel")
            summary = gr.Markdown(elem_id="method-summary")
            text_scores = gr.Plot(label="Text scores", elem_id="method-text-scores")
            graph = gr.Plot(label="CLEANN graph", elem_id="cleann-graph")
        return cls(method, map_name, cleann_layer, cleann_head, relevancy_vision, image, summary, text_scores, graph,
                   cancel)

    def own_controls(self) -> list:
        """The methods' own controls, in `panel_options`' order."""
        return [self.cleann_layer, self.cleann_head, self.relevancy_vision]

    def controls(self) -> list:
        """What a rendering reads: the method, the map and the methods' own controls."""
        return [self.method, self.map_name, *self.own_controls()]

    def outputs(self) -> list:
        return [self.image, self.map_name, self.cleann_layer, self.cleann_head, self.relevancy_vision, self.summary,
                self.text_scores, self.graph]


class Cancelled(UserInputError):
    """The reader pressed Cancel while a slow method ran."""


class Cancellations:
    """The Cancel button's requests, per page session. Gradio's `cancels` drops the session's queued method events
    but lets a running handler finish, so the running one is stopped here: `progress` wraps its progress bar, and
    the next iteration after `ask` raises (nothing is cached; choosing the method again starts over)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._asked: set[str] = set()

    def ask(self, session: str) -> None:
        with self._lock:
            self._asked.add(session)

    def progress(self, progress, session: str):
        """`progress(fraction, desc=...)` that raises Cancelled once the session asked to cancel; a Cancel
        pressed before this run does not stop it."""
        with self._lock:
            self._asked.discard(session)

        shown = []

        def report(fraction: float, desc: str = "") -> None:
            with self._lock:
                asked = session in self._asked
                self._asked.discard(session)
            if asked:
                raise Cancelled(f"cancelled ({desc}): choose the method or the word again to start it over")
            if progress is not None and shown[-1:] != [fraction]:  # a repeated step (a backend's poll) redraws nothing
                shown.append(fraction)
                progress(fraction, desc=desc)
        return report


def _cleann_choices(trace: TraceView) -> tuple[list[str], list[str]]:
    return [DEFAULT_LAYER, *map(str, range(trace.n_layers))], [ALL_HEADS, *map(str, range(trace.n_heads))]


def cleann_choice(trace: TraceView, cleann_layer: str | None, cleann_head: str | None) -> tuple[str, str]:
    """The chosen layer and head where the trace's model has them (choices left from another model fall back to
    the defaults)."""
    layers, heads = _cleann_choices(trace)
    return (cleann_layer if cleann_layer in layers else DEFAULT_LAYER,
            cleann_head if cleann_head in heads else ALL_HEADS)


def panel_options(trace: TraceView, cleann_layer: str | None = None, cleann_head: str | None = None,
                  relevancy_vision: bool | None = None) -> dict[str, dict]:
    """Every method's options as the panel's controls set them, for the method shown, the gallery and the exports;
    only what differs from a method's defaults, so that the page shares cached maps with every other caller."""
    layer, head = cleann_choice(trace, cleann_layer, cleann_head)
    cleann = {**({} if layer == DEFAULT_LAYER else {"layer": int(layer)}),
              **({} if head == ALL_HEADS else {"head": int(head)})}
    return {"cleann": cleann, "relevancy": {} if relevancy_vision is not False else {"vision": False}}


def method_controls(trace: TraceView, method: str, cleann_layer: str | None, cleann_head: str | None,
                    relevancy_vision: bool | None) -> tuple:
    """The methods' own controls for the trace's model, each shown while its method is. (A component made in an
    event has no readable value: take the values from `cleann_choice` / `panel_options`.)"""
    layers, heads = _cleann_choices(trace)
    layer, head = cleann_choice(trace, cleann_layer, cleann_head)
    return (gr.Dropdown(choices=layers, value=layer, visible=method == "cleann"),
            gr.Dropdown(choices=heads, value=head, visible=method == "cleann"),
            gr.Checkbox(value=relevancy_vision is not False, visible=method == "relevancy"))


def summarise(explanation) -> str:
    details = explanation.details
    if explanation.method in ("igos", "igos_answer"):
        rows, cols = details["mask_size"]
        what = "the answer's visually relevant tokens together" if explanation.method == "igos_answer" else "the token"
        first, last = details["objective"][0], details["objective"][-1]
        return (f"**iGOS++** ({what}): saliency = 1 - a {rows} x {cols} mask optimised for {details['iterations']} "
                f"iterations (objective {first:.3f} -> {last:.3f}).")
    if explanation.method != "cleann":
        return ""
    other_views = "".join(f" (+{len(cells)} in the {name} view)" for name, cells in details["view_cells"].items())
    return (f"**CLEANN** (layer {details['layer']}, head {details['head']}): {details['message']}; "
            f"{len(details['image_cells'])} image cells{other_views}, text positions {details['text_tokens']}; "
            f"{len(details['edges'])} graph edges.")


def render_method(service: ExplainBackend, request_id: str, image: Image.Image, token_index: int | None, method: str,
                  map_name: str | None = None, options: dict | None = None, progress=None) -> tuple:
    """(the map on the image with its colour bar and caption, the method's maps as (label, name) choices, the map
    shown, a summary, text-score bars, CLEANN graph). `token_index` None: no token picked yet (token 0's maps, or
    the method's answer-level map where it has one); `progress(fraction, desc=...)` follows iGOS++'s iterations
    when the service runs in this process."""
    trace = service.trace(request_id)
    whole_answer = token_index is None and hasattr(METHODS[method], "explain_answer")

    def report(done, total):
        if progress is not None:
            progress(done / total, desc=f"{method}: iteration {done} of {total}")

    with reporting_progress(report):
        explanation = service.explain_answer(request_id, method, **(options or {})) if whole_answer else \
            service.explain(request_id, method, token_index or 0, **(options or {}))
    maps = explanation.all_maps()
    shown = map_name if map_name in maps else explanation.method
    if whole_answer:
        words = " ".join(token_word(trace.answer_texts[t]) for t in explanation.details["tokens"])
        caption = f"{words} \u00b7 {map_label(shown)}"
    else:
        caption = map_caption(trace.answer_texts[token_index or 0], shown, explanation.details)
    picture = captioned_map(image, maps[shown][0], trace.images[0], caption, width=display_width(image))
    return (picture, [(map_label(name), name) for name in maps], shown, summarise(explanation),
            text_scores_figure(trace, explanation), cleann_graph_figure(trace, explanation))
