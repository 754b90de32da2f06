"""One line above the views saying what they show (which word of which answer, on which model), and saying so
when the inputs changed since: the views never pass off an earlier request's results as the current ones.
(They are marked, not cleared: an upload's change event may reach the server after the Generate it preceded.)"""

from __future__ import annotations

import html

import gradio as gr
import numpy as np
from PIL import Image

from lvlm_interpret import ExplainBackend
from lvlm_interpret.images import prepare_image
from lvlm_interpret.rendering import token_word


NOTHING_YET = "Generate an answer to see where the model looked."


def build() -> gr.Markdown:
    return gr.Markdown(NOTHING_YET, elem_id="request-status")


def describe(service: ExplainBackend, state: dict) -> str:
    """What the views show now: the selected word, its position, the prompt and the model."""
    if not state:
        return NOTHING_YET
    trace = service.trace(state["request_id"])
    token = state["token"]
    return (f"Showing **{html.escape(token_word(trace.answer_texts[token]))}** (answer token {token}, read from "
            f"position {trace.source_position(token)}, which predicts it) of the answer to "
            f"*{html.escape(trace.prompt)}* on model `{trace.model_name}`.")


def stale(state: dict, service: ExplainBackend, prompt: str, image: Image.Image | None) -> str:
    """After the prompt or the image was changed (typed, uploaded, an example picked): the views still show the
    last answer, to other inputs, until Generate."""
    if not state:
        return NOTHING_YET
    asked = service.trace(state["request_id"]).prompt
    changed = [name for name, differs in [
        ("prompt", (prompt or "").strip() != asked),
        ("image", image is None or not np.array_equal(np.asarray(prepare_image(image)), np.asarray(state["image"])))]
        if differs]
    if not changed:
        return describe(service, state)
    return (f"⚠ The {' and the '.join(changed)} changed: the answer and maps below are for the earlier "
            f"{' and '.join(changed)} (prompt *{html.escape(asked)}*). Press Generate for the new one.")
