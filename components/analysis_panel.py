"""Analyses panel (Neo et al.): ablate or knock out a set of image tokens for the current request and selected
token, and browse the logit lens on the image (hover a patch for its top tokens, move the layer slider).
The computation is the library's (lvlm_interpret.analysis), reached through the service."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
from PIL import Image

from lvlm_interpret import ExplainBackend, UserInputError
from lvlm_interpret.analysis.knockout import WINDOWS, knockout_figure, layer_span
from lvlm_interpret.analysis.token_sets import positions_to_cells
from lvlm_interpret.rendering import blend, overlay, plotly_heatmap, token_word

from .method_panel import method_names

BOX_SET = "object (box)"
SETS = {BOX_SET: "object", "high-norm tokens (register-like)": "register", "random k": "random",
        "top k of a method": "top"}
LENS_TOP_K = 5


@dataclass
class AnalysisPanel:
    token_set: gr.Radio
    box: gr.Textbox
    buffer: gr.Slider
    k: gr.Number
    seed: gr.Number
    method: gr.Dropdown
    replacement: gr.Radio
    windows: gr.CheckboxGroup
    ablate: gr.Button
    knockout: gr.Button
    tokens: gr.Image
    summary: gr.Markdown
    drops: gr.Plot
    layer: gr.Slider
    lens: gr.Plot

    @classmethod
    def build(cls) -> "AnalysisPanel":
        with gr.Column():
            gr.Markdown("Acts on the selected answer token. Box: x0,y0,x1,y1 in the image's pixels, typed or drawn "
                        "by clicking two opposite corners on the image below.")
            with gr.Row():
                token_set = gr.Radio(list(SETS), value=BOX_SET, label="Image tokens", elem_id="analysis-set")
                box = gr.Textbox(label="Box", placeholder="x0,y0,x1,y1", elem_id="analysis-box")
            with gr.Row():
                buffer = gr.Slider(0, 2, value=0, step=1, label="Patch buffer")
                k = gr.Number(value=10, precision=0, label="k", visible=False)
                seed = gr.Number(value=0, precision=0, label="Seed (random)", visible=False)
                names = method_names()
                method = gr.Dropdown(names, value=names[0], label="Method (top k)", visible=False)
            with gr.Row():
                replacement = gr.Radio(["mean", "zero"], value="mean", label="Ablation",
                                       info="mean: the mean embedding of the example scenes")
                windows = gr.CheckboxGroup(list(WINDOWS), value=list(WINDOWS), label="Knockout windows")
            with gr.Row():
                ablate = gr.Button("Ablate", elem_id="analysis-ablate")
                knockout = gr.Button("Knock out", elem_id="analysis-knockout")
            tokens = gr.Image(type="pil", label="Chosen tokens (click two corners to draw a box)", interactive=False,
                              height=240, format="png", elem_id="analysis-tokens")
            summary = gr.Markdown(elem_id="analysis-summary")
            drops = gr.Plot(label="Knockout: probability drop per layer window", elem_id="analysis-knockout-plot")
            layer = gr.Slider(0, 1, value=0, step=1, label="Logit lens layer", elem_id="analysis-lens-layer")
            lens = gr.Plot(label="Logit lens (hover a patch for its top tokens)", elem_id="analysis-lens")
        return cls(token_set, box, buffer, k, seed, method, replacement, windows, ablate, knockout, tokens, summary,
                   drops, layer, lens)

    def selection(self) -> list:
        return [self.token_set, self.box, self.buffer, self.k, self.seed, self.method]


def _check(state):
    if not state:
        raise UserInputError("generate an answer first")


def choose_tokens(service: ExplainBackend, state: dict, token_set: str, box: str, buffer, k, seed, method):
    """(positions, picture of the chosen cells) for the panel's selection."""
    _check(state)
    kind = SETS.get(token_set)
    if kind is None:
        raise UserInputError(f"unknown token set {token_set!r}")
    options = {"buffer": int(buffer), "k": int(k) if k is not None else None, "seed": int(seed or 0),
               "method": method}
    if kind == "object":
        if not box or not box.strip():
            raise UserInputError("give the object's box as x0,y0,x1,y1 in image pixels")
        options["box"] = box.split(",")
    positions = service.analysis_tokens(state["request_id"], kind, state["token"], **options)
    if not positions:
        raise UserInputError(f"no {token_set} tokens in this image: choose another set")
    trace = service.trace(state["request_id"])
    cells = positions_to_cells(trace, positions).astype(np.float32)
    return positions, blend(state["image"], overlay(cells, trace.images[0]))


def run_ablation(service: ExplainBackend, state: dict, replacement: str, *selection) -> tuple[Image.Image, str]:
    positions, picture = choose_tokens(service, state, *selection)
    result = service.ablate(state["request_id"], positions, state["token"], replacement)
    summary = (f"**{replacement.capitalize()} ablation of {len(positions)} image tokens**: p({result.target.strip()!r})"
               f" {result.prob_before:.4f} -> {result.prob_after:.4f}"
               f"{'' if result.still_argmax else ' (no longer the top token)'}; answer "
               f"*{result.answer_before}* -> *{result.answer_after}*")
    return picture, summary


def run_knockout(service: ExplainBackend, state: dict, windows: list[str], *selection):
    if not windows:
        raise UserInputError("tick at least one layer window")
    positions, picture = choose_tokens(service, state, *selection)
    result = service.knockout(state["request_id"], positions, state["token"], windows)
    lines = [f"{w.window} ({layer_span(w.layers)}): p {w.prob:.4f}, drop {100 * d:.1f}%"
             for w, d in zip(result.windows, result.drops())]
    summary = (f"**Knockout** of {len(positions)} image tokens from the position predicting "
               f"{result.target.strip()!r} (p {result.prob_before:.4f}): " + "; ".join(lines))
    return picture, summary, knockout_figure(result)


def lens_figure(service: ExplainBackend, state: dict, layer: int):
    """The image with each patch coloured by its top token's probability at `layer`; hover lists the top k."""
    _check(state)
    lens = service.logit_lens(state["request_id"], LENS_TOP_K)
    trace = service.trace(state["request_id"])
    slot = int(np.clip(layer, 0, len(lens.layers) - 1))
    top_prob = lens.probs[slot, :, 0].reshape(lens.rows, lens.cols)
    figure = plotly_heatmap(state["image"], top_prob, trace.images[0],
                            title=f"Logit lens after layer {lens.layers[slot]}: each patch's most likely next word "
                                  "(colour: its probability)")
    cells = [[lens.cell(slot, r, c) for c in range(lens.cols)] for r in range(lens.rows)]
    top_words = np.array([[token_word(cell[0][0]) for cell in row] for row in cells], dtype=object)
    hover = np.array([["<br>".join(f"{token_word(text)} {p:.3f}" for text, p in cell) for cell in row]
                      for row in cells], dtype=object)
    figure.update_traces(text=top_words, texttemplate="%{text}", hovertext=hover,
                         hovertemplate="row %{customdata[0]}, col %{customdata[1]}<br>%{hovertext}<extra></extra>",
                         selector=dict(type="heatmap"))
    return figure


def selection_controls(token_set: str) -> tuple:
    """Only the settings the chosen token set reads: a box and its buffer, or k with a seed or a method."""
    kind = SETS.get(token_set)
    return (gr.Textbox(visible=kind == "object"), gr.Slider(visible=kind == "object"),
            gr.Number(visible=kind in ("random", "top")), gr.Number(visible=kind == "random"),
            gr.Dropdown(visible=kind == "top"))


def box_click(box: str, x: float, y: float) -> str:
    """Two clicks draw a box: the first gives one corner, the second the opposite one (in image pixels)."""
    parts = [p for p in (box or "").split(",") if p.strip()]
    if len(parts) != 2:
        return f"{x:.0f},{y:.0f}"
    try:
        x0, y0 = float(parts[0]), float(parts[1])
    except ValueError:
        return f"{x:.0f},{y:.0f}"
    return f"{min(x0, x):.0f},{min(y0, y):.0f},{max(x0, x):.0f},{max(y0, y):.0f}"


def wire(panel: AnalysisPanel, service, session: gr.State, user_errors) -> None:
    """Connect the panel's buttons and slider (handlers wrapped by the app's `user_errors`)."""
    panel.ablate.click(user_errors(lambda state, replacement, *selection: run_ablation(
        service, state, replacement, *selection)), [session, panel.replacement, *panel.selection()],
        [panel.tokens, panel.summary])
    panel.knockout.click(user_errors(lambda state, windows, *selection: run_knockout(
        service, state, windows, *selection)), [session, panel.windows, *panel.selection()],
        [panel.tokens, panel.summary, panel.drops])
    # change, not release: arrow keys move the slider too
    panel.layer.change(user_errors(lambda state, layer: lens_figure(service, state, layer) if state else None),
                       [session, panel.layer], panel.lens)
    panel.token_set.change(selection_controls, panel.token_set, [panel.box, panel.buffer, panel.k, panel.seed,
                                                                 panel.method])

    def on_click(state, box, buffer, event: gr.SelectData):
        """Clicks on the picture draw a box: the token set becomes the box."""
        box = box_click(box, *event.index)
        return BOX_SET, box, drawn_box_picture(service, state, box, buffer)
    panel.tokens.select(user_errors(on_click), [session, panel.box, panel.buffer],
                        [panel.token_set, panel.box, panel.tokens])


def drawn_box_picture(service: ExplainBackend, state: dict, box: str, buffer):
    """What the picture shows while a box is drawn: the image once the first corner is set, the chosen cells once
    both are (a box that holds no cell says so in a notice and keeps the image)."""
    if not state:
        return gr.skip()
    if len(box.split(",")) != 4:
        return state["image"]
    try:
        return choose_tokens(service, state, BOX_SET, box, buffer, None, 0, None)[1]
    except UserInputError as error:
        gr.Warning(str(error))
        return state["image"]


def on_new_request(service, state) -> tuple:
    """After a generation: the slider spans the model's layers, the lens shows the last one, and the image is
    ready for drawing a box."""
    last = service.trace(state["request_id"]).n_layers - 1
    # the slider is built from `last`: inside an event Gradio returns an update object without `.value`
    return gr.Slider(0, last, value=last, step=1), lens_figure(service, state, last), state["image"]
