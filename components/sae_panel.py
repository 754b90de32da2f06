"""Features tab: a sparse autoencoder's features on the selected request's image. Click a cell for its top
features; pick a feature for its map on this image and its top-activating patches over the SAE's cached demo
scenes; scale or zero it (and clamp another) at the SAE's hook point, and read the answer it gives then with the
selected answer word's attention and TAM maps before and after. The computation is the library's
(lvlm_interpret.sae), reached through the service."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import gradio as gr
import numpy as np
from PIL import Image

from lvlm_interpret import ExplainBackend, UserInputError
from lvlm_interpret.rendering import blend, cell_at, overlay
from lvlm_interpret.sae.format import SAE_NAMES

WAITING = "Click a cell of the image for its strongest features."
TOP_FEATURES = 10


@dataclass
class SAEPanel:
    sae: gr.Dropdown
    picture: gr.Image
    cell_features: gr.Dataframe
    feature: gr.Number
    show: gr.Button
    summary: gr.Markdown
    patches: gr.Gallery
    scale: gr.Slider
    clamp: gr.Checkbox
    clamp_feature: gr.Number
    clamp_value: gr.Number
    steer: gr.Button
    steered: gr.Markdown
    steered_maps: gr.Gallery

    @classmethod
    def build(cls) -> "SAEPanel":
        with gr.Column():
            gr.Markdown("A sparse autoencoder splits one layer's image-token activations into sparse features "
                        "(docs/sae.md). The shipped SAEs read the demo model: `demo` at LM layer 2 (one feature "
                        "per colour and shape), `demo-steer` at LM layer 0 (edits there change answers).")
            sae = gr.Dropdown(list(SAE_NAMES), value="demo", label="SAE", elem_id="sae-name")
            with gr.Row():
                picture = gr.Image(type="pil", label="Click a cell", interactive=False, height=320, format="png",
                                   elem_id="sae-image")
                with gr.Column():
                    cell_features = gr.Dataframe(headers=["feature", "activation"], interactive=False,
                                                 label="The cell's top features (click one)",
                                                 elem_id="sae-cell-features")
                    with gr.Row():
                        feature = gr.Number(value=None, precision=0, label="Feature", elem_id="sae-feature")
                        show = gr.Button("Show feature", elem_id="sae-show")
            summary = gr.Markdown(WAITING, elem_id="sae-summary")
            patches = gr.Gallery(label="Top-activating patches over the cached scenes", columns=8, height=140,
                                 elem_id="sae-patches")
            with gr.Row():
                scale = gr.Slider(-2, 10, value=0, step=0.5, label="Scale the feature (0 zeroes it, 1 leaves it)",
                                  elem_id="sae-scale")
                clamp = gr.Checkbox(value=False, label="and clamp another feature", elem_id="sae-clamp")
                clamp_feature = gr.Number(value=None, precision=0, label="feature", elem_id="sae-clamp-feature")
                clamp_value = gr.Number(value=30, label="to activation", elem_id="sae-clamp-value")
                steer = gr.Button("Answer with the features edited", elem_id="sae-steer")
            steered = gr.Markdown(elem_id="sae-steered")
            steered_maps = gr.Gallery(label="The selected answer word's maps, before and after the edit (one colour "
                                            "scale per method)", columns=4, height=220, format="png",
                                      elem_id="sae-steered-maps")
        return cls(sae, picture, cell_features, feature, show, summary, patches, scale, clamp, clamp_feature,
                   clamp_value, steer, steered, steered_maps)


def _check(state):
    if not state:
        raise UserInputError("generate an answer first")


def cleared(state) -> tuple:
    """The panel on a new request: its image, nothing of the last one's features."""
    return (state["image"] if state else None), None, None, WAITING, [], "", []


def cell_features(service: ExplainBackend, state: dict, sae: str, x: float, y: float) -> tuple:
    """(rows [feature, activation], summary, first feature) of the cell under pixel (x, y) of the image."""
    _check(state)
    trace = service.trace(state["request_id"])
    cell = cell_at(trace.images[0], x, y)
    if cell is None:
        raise UserInputError("that point is outside the part of the image the model sees")
    features = service.sae_features(state["request_id"], sae, TOP_FEATURES)
    top = features["cells"][cell[0]][cell[1]]
    rows = [[entry["feature"], round(entry["activation"], 4)] for entry in top]
    summary = (f"Cell ({cell[0]}, {cell[1]}) at `{features['hook_name']}`: its {len(top)} strongest of "
               f"{features['n_features']} features" + ("; pick one." if top else " (none fires here)."))
    return rows, summary, (top[0]["feature"] if top else None)


def _picture(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


def feature_view(service: ExplainBackend, state: dict, sae: str, feature) -> tuple:
    """(the image with the feature's map, summary, gallery of top patches)."""
    _check(state)
    if feature is None:
        raise UserInputError("type a feature number, or click a cell and then one of its features")
    view = service.sae_feature(state["request_id"], sae, int(feature), top=8)
    trace = service.trace(state["request_id"])
    grid_map = np.asarray(view["map"], dtype=np.float32)
    picture = blend(state["image"], overlay(grid_map, trace.images[0], vmin=0.0,
                                            vmax=max(view["max"], 1e-6)))
    tiles = [(_picture(cell["patch"]), f"{cell['value']:.2f}") for cell in view["top_cells"]]
    where = "" if view["cached_images"] is None else f" over {view['cached_images']} cached scenes"
    summary = (f"Feature **{int(feature)}** at `{view['hook_name']}`: at most {view['max']:.3f} on this image; "
               f"its top patches{where} below.")
    return picture, summary, tiles


def steer(service: ExplainBackend, state: dict, sae: str, feature, scale, clamp_feature=None,
          clamp_value=None) -> tuple[str, list]:
    """(the edited answer next to the original, the selected answer word's attention and TAM maps before and after
    on one colour scale per method)."""
    _check(state)
    if feature is None:
        raise UserInputError("choose a feature first")
    values = {}
    if clamp_feature is not None:
        if clamp_value is None:
            raise UserInputError("give the activation to clamp the second feature to (or untick the clamp)")
        values = {int(clamp_feature): float(clamp_value)}
    result = service.sae_steer(state["request_id"], sae, {int(feature): float(scale)}, values,
                               token_index=state.get("token", 0))
    layout = service.trace(state["request_id"]).images[0]
    tiles = []
    for method, pair in result["maps"].items():
        before, after = (np.asarray(pair[when], dtype=np.float32) for when in ("before", "after"))
        top = max(float(before.max()), float(after.max()), 1e-6)
        tiles += [(blend(state["image"], overlay(before, layout, vmin=0.0, vmax=top)),
                   f"{method} before: {result['token_before'].strip()}"),
                  (blend(state["image"], overlay(after, layout, vmin=0.0, vmax=top)),
                   f"{method} after: {result['token'].strip()}")]
    change = "changed" if result["answer_changed"] else "unchanged"
    clamped = "".join(f", feature {f} clamped to {v:g}" for f, v in result["values"].items())
    return (f"Feature {int(feature)} x {float(scale):g}{clamped}: **{result['answer']}** ({change}; before: "
            f"{result['answer_before']})"), tiles


def wire(panel: SAEPanel, service, session: gr.State, user_errors) -> None:
    """Connect the panel's clicks and buttons (handlers wrapped by the app's `user_errors`)."""
    def on_cell(state, sae, event: gr.SelectData):
        return cell_features(service, state, sae, *event.index)
    panel.picture.select(user_errors(on_cell), [session, panel.sae],
                         [panel.cell_features, panel.summary, panel.feature])

    def on_row(rows, event: gr.SelectData):
        return int(event.row_value[0])
    panel.cell_features.select(on_row, panel.cell_features, panel.feature).then(
        user_errors(lambda state, sae, feature: feature_view(service, state, sae, feature)),
        [session, panel.sae, panel.feature], [panel.picture, panel.summary, panel.patches])
    panel.show.click(user_errors(lambda state, sae, feature: feature_view(service, state, sae, feature)),
                     [session, panel.sae, panel.feature], [panel.picture, panel.summary, panel.patches])
    panel.steer.click(user_errors(lambda state, sae, feature, scale, clamp, clamp_feature, clamp_value: steer(
        service, state, sae, feature, scale, clamp_feature if clamp else None, clamp_value)),
        [session, panel.sae, panel.feature, panel.scale, panel.clamp, panel.clamp_feature, panel.clamp_value],
        [panel.steered, panel.steered_maps])


def outputs_on_new_request(panel: SAEPanel) -> list:
    return [panel.picture, panel.cell_features, panel.feature, panel.summary, panel.patches, panel.steered,
            panel.steered_maps]
