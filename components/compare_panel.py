"""Compare: request B is the current request (A) with its prompt, image and / or model changed. The two answers
stand side by side with their aligned words marked; clicking a word in either selects its match in the other;
every chosen map is shown for both, with a difference map where the grids match, the maps' similarity
(lvlm_interpret.compare) and both tokens' image / text shares of relevancy as bars."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
import plotly.graph_objects as go
from PIL import Image

from lvlm_interpret import ExplainBackend, UserInputError
from lvlm_interpret.compare import compare_requests, token_maps
from lvlm_interpret.images import prepare_image
from lvlm_interpret.methods.visual_relevance import STOP_WORDS
from lvlm_interpret.rendering import caption_strip, captioned_map, map_caption, token_word

from .comparison_panel import TILE_WIDTH
from .generation import decoded_by_the_product, model_choices, run_generation

MAP_CHOICES = ["attention", "relevancy", "relevancy_vit", "relevancy_all", "tam", "tam_raw", "tam_cleaned"]
DEFAULT_MAPS = ["attention", "relevancy", "tam"]
SELECTED, PAIRED = "selected", "in both answers"
WAITING = ("Generate an answer first (it is request A), then change its prompt, image or model here and press "
           "**Compare with B**.")
SAME_AS_A = "same as A"
# The two trained demo models (LLaVA and Qwen2-VL layouts) are each other's default B: "which model looks where".
DEMO_PAIR = {"demo": "demo-qwen2_vl", "demo-qwen2_vl": "demo"}


@dataclass
class ComparePanel:
    prompt_b: gr.Textbox
    image_b: gr.Image
    model_b: gr.Dropdown
    maps: gr.CheckboxGroup
    button: gr.Button
    answer_a: gr.HighlightedText
    answer_b: gr.HighlightedText
    summary: gr.Markdown
    similarity: gr.Dataframe
    tiles: gr.Gallery
    shares: gr.Plot
    state: gr.State

    @classmethod
    def build(cls, default_model: str, allowed_models: list[str] | None = None) -> "ComparePanel":
        state = gr.State({})
        gr.Markdown("Request B is the current answer's request (A) with what you change here; an empty field keeps "
                    "A's. Words are aligned by their text, in order: click a word in either answer to see both "
                    "maps, their difference and how alike they are.")
        with gr.Row():
            with gr.Column(scale=2):
                prompt_b = gr.Textbox(label="B's prompt (empty: A's)", lines=1, elem_id="compare-prompt-b")
                choices = model_choices(default_model, allowed_models)
                partner = DEMO_PAIR.get(default_model, "")
                model_b = gr.Dropdown([(SAME_AS_A, ""), *choices],
                                      value=partner if partner in dict(choices).values() else "",
                                      label="B's model", elem_id="compare-model-b")
                maps = gr.CheckboxGroup(MAP_CHOICES, value=DEFAULT_MAPS, label="Maps", elem_id="compare-maps")
                button = gr.Button("Compare with B", variant="primary", elem_id="compare-run")
            with gr.Column(scale=1):
                image_b = decoded_by_the_product(gr.Image(type="pil", label="B's image (empty: A's)", height=200,
                                                          image_mode=None, elem_id="compare-image-b"))
        with gr.Row():
            colours = {SELECTED: "#f59e0b", PAIRED: "#bbf7d0"}
            answer_a = gr.HighlightedText(label="A", color_map=colours, show_legend=False,
                                          show_inline_category=False, interactive=False, elem_id="compare-answer-a",
                                          elem_classes="compare-answer")
            answer_b = gr.HighlightedText(label="B", color_map=colours, show_legend=False,
                                          show_inline_category=False, interactive=False, elem_id="compare-answer-b",
                                          elem_classes="compare-answer")
        summary = gr.Markdown(WAITING, elem_id="compare-summary")
        similarity = gr.Dataframe(headers=["map", "Spearman", "top-10% IoU", "argmax shift (cells)"],
                                  interactive=False, elem_id="compare-similarity")
        tiles = gr.Gallery(label="Each map: A, B and A - B", height="auto", object_fit="contain", format="png",
                           elem_id="compare-tiles", elem_classes="map-tiles")
        shares = gr.Plot(label="Image / text share of relevancy", elem_id="compare-shares")
        return cls(prompt_b, image_b, model_b, maps, button, answer_a, answer_b, summary, similarity, tiles, shares,
                   state)

    def outputs(self) -> list:
        return [self.state, self.answer_a, self.answer_b, self.summary, self.similarity, self.tiles, self.shares]


def cleared() -> tuple:
    """The panel before a comparison with the current request A: nothing of an earlier one."""
    return {}, None, None, WAITING, None, None, None


def map_methods(map_names: list[str]) -> list[str]:
    """The methods that make these maps (`relevancy_vit` -> relevancy), in order."""
    return list(dict.fromkeys(name.split("_")[0] for name in map_names))


def run_compare(service: ExplainBackend, session: dict, prompt_b: str, image_b, model_b: str, map_names: list[str],
                max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """Generate B from A (the session's request) and compare them: the panel's state, `first_pair` selected."""
    if not session:
        raise UserInputError("generate an answer first: it is request A")
    if not map_names:
        raise UserInputError("choose at least one map to compare")
    prompt_b = (prompt_b or "").strip()
    changed = [name for name, value in (("prompt", prompt_b), ("image", image_b is not None), ("model", model_b))
               if value]
    if not changed:
        raise UserInputError("request B is the same as request A: change its prompt, image or model")
    trace_a = service.trace(session["request_id"])
    picture_b = session["image"] if image_b is None else prepare_image(image_b)
    request_b, _ = run_generation(service, picture_b, prompt_b or trace_a.prompt, model_b or trace_a.model_name,
                                  max_new_tokens, temperature, top_p)
    comparison = compare_requests(service, session["request_id"], request_b, map_methods(map_names))
    return {"a": session["request_id"], "b": request_b, "image_a": session["image"], "image_b": picture_b,
            "maps": list(map_names), "changed": changed, "comparison": comparison,
            "pair": first_pair(comparison["pairs"])}


def first_pair(pairs: list[dict]) -> int | None:
    """The pair shown first: the first content word both answers share (else the first pair; None if none)."""
    if not pairs:
        return None
    return next((k for k, pair in enumerate(pairs) if pair["text"].isalpha() and pair["text"].lower() not in
                 STOP_WORDS), 0)


def select_word(state: dict, side: str, token_index: int) -> dict:
    """The state with the pair of `side`'s token `token_index` selected (one notice if it has no match)."""
    if not state:
        raise UserInputError("press Compare with B first")
    pairs = state["comparison"]["pairs"]
    found = next((k for k, pair in enumerate(pairs) if pair[side] == token_index), None)
    if found is None:
        other = "B" if side == "a" else "A"
        text = state["comparison"][side]["answer_tokens"][token_index]["text"]
        raise UserInputError(f"{token_word(text)} has no matching word in {other}'s answer: choose a word marked "
                             "green")
    return {**state, "pair": found}


def strip_value(summary: dict, side: str, pairs: list[dict], selected: dict | None) -> list[tuple[str, str | None]]:
    """One entry per answer token: the selected pair's token, the others that pair, the rest unmarked."""
    paired = {pair[side] for pair in pairs}
    return [(token["text"] if token["text"].strip() else repr(token["text"]),
             SELECTED if selected and selected[side] == index else PAIRED if index in paired else None)
            for index, token in enumerate(summary["answer_tokens"])]


def difference_tile(map_a: np.ndarray, map_b: np.ndarray, image: Image.Image, layout, shift: float) -> Image.Image:
    """A - B, each map scaled to its own maximum, over A's image: blue where A's map is higher, red where B's is."""
    scaled_a, scaled_b = (m / m.max() if m.max() > 0 else m for m in (map_a, map_b))
    return captioned_map(image, scaled_a - scaled_b, layout, f"A - B, each scaled to its maximum: blue where A is "
                         f"higher, red where B is; highest cells {shift:.1f} cells apart", vmin=-1.0, vmax=1.0,
                         width=TILE_WIDTH, colorscale="RdBu")


def render(service: ExplainBackend, state: dict) -> tuple:
    """(answer A, answer B, summary, similarity rows, tiles, shares figure) of the panel's state."""
    if not state:
        return cleared()[1:]
    comparison, pair = state["comparison"], state["pair"]
    pairs = comparison["pairs"]
    selected = None if pair is None else pairs[pair]
    strips = (strip_value(comparison["a"], "a", pairs, selected), strip_value(comparison["b"], "b", pairs, selected))
    grids = [comparison[side]["image"]["grid"] for side in "ab"]
    changes = ", ".join(state["changed"])
    if selected is None:
        return (*strips, f"B changes A's {changes}. The two answers share no word: there is nothing to pair.",
                None, None, None)
    word = token_word(selected["text"])
    grid_note = "one grid" if comparison["grids_match"] else (
        f"grids differ ({grids[0][0]}x{grids[0][1]} and {grids[1][0]}x{grids[1][1]}): B's maps are resampled onto "
        "A's grid for the numbers, and there is no difference map")
    summary = (f"**{word}**: token {selected['a']} of A and token {selected['b']} of B. B changes A's {changes}; "
               f"{len(pairs)} words pair; {grid_note}.")
    rows = [[name, selected["similarity"][name]["spearman"], selected["similarity"][name]["top_iou"],
             selected["similarity"][name]["argmax_shift_cells"]] for name in state["maps"]]
    return (*strips, summary, rows, _tiles(service, state, selected), _shares_figure(comparison, selected))


def _tiles(service: ExplainBackend, state: dict, selected: dict) -> list[Image.Image]:
    """For each chosen map: A's, B's and their difference (or why there is none)."""
    methods = map_methods(state["maps"])
    maps = {side: token_maps(service, state[side], selected[side], methods) for side in "ab"}
    layouts = {side: service.trace(state[side]).images[0] for side in "ab"}
    tiles = []
    for name in state["maps"]:
        for side in "ab":
            tiles.append(captioned_map(state[f"image_{side}"], maps[side][name], layouts[side],
                                       f"{side.upper()} \u00b7 {map_caption(selected['text'], name)}",
                                       width=TILE_WIDTH))
        shift = selected["similarity"][name]["argmax_shift_cells"]
        if state["comparison"]["grids_match"]:
            tiles.append(difference_tile(maps["a"][name], maps["b"][name], state["image_a"], layouts["a"], shift))
        else:
            tiles.append(caption_strip(f"{name}: no difference map, the grids differ. B's map resampled onto A's "
                                       f"grid peaks {shift:.1f} of A's cells away from A's.", TILE_WIDTH))
    return tiles


def _shares_figure(comparison: dict, selected: dict) -> go.Figure:
    """Stacked bars: the share of each token's relevancy on the image and on the text."""
    word = token_word(selected["text"])
    labels = [f"A {word} (token {selected['a']})", f"B {word} (token {selected['b']})"]
    image = [comparison["image_share"][side][selected[side]] for side in "ab"]
    figure = go.Figure([
        go.Bar(name="image", x=labels, y=image, marker_color="#2563eb", texttemplate="%{y:.0%}"),
        go.Bar(name="text", x=labels, y=[1 - share for share in image], marker_color="#d1d5db",
               texttemplate="%{y:.0%}"),
    ])
    figure.update_layout(barmode="stack", height=280, yaxis=dict(range=[0, 1], tickformat=".0%"),
                         title=f"{word}: where its relevancy lies", margin=dict(l=10, r=10, t=40, b=10))
    return figure


def wire(panel: ComparePanel, service: ExplainBackend, session: gr.State, generation_options: list,
         user_errors) -> None:
    """Connect the panel: Compare generates B and shows its first pair; a word clicked in either answer selects its
    pair. `generation_options`: the page's max new tokens, temperature and top-p (B is generated with them);
    handlers wrapped by the app's `user_errors`."""
    def on_compare(session_state, prompt_b, image_b, model_b, map_names, *options, progress=gr.Progress()):
        progress(0.1, desc="generating B and comparing")
        state = run_compare(service, session_state, prompt_b, image_b, model_b, map_names, *options)
        return (state, *render(service, state))

    def on_word(side):
        def on_compared_word(state, event: gr.SelectData):
            state = select_word(state, side, int(event.index))
            return (state, *render(service, state))
        return on_compared_word

    panel.button.click(user_errors(on_compare), [session, panel.prompt_b, panel.image_b, panel.model_b, panel.maps,
                                                 *generation_options], panel.outputs())
    panel.answer_a.select(user_errors(on_word("a")), panel.state, panel.outputs())
    panel.answer_b.select(user_errors(on_word("b")), panel.state, panel.outputs())
