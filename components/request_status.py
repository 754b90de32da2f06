"""One line above the views saying what they show (which word of which answer, on which model), and saying so
when the inputs changed since: the views never pass off an earlier request's results as the current ones."""

from __future__ import annotations

import html

import gradio as gr

from lvlm_interpret import ExplainBackend
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


def stale(state: dict, service: ExplainBackend, prompt: str) -> str:
    """After the prompt was edited: the views still show the last answer, to another prompt."""
    if not state:
        return NOTHING_YET
    asked = service.trace(state["request_id"]).prompt
    if (prompt or "").strip() == asked:
        return describe(service, state)
    return (f"⚠ The prompt changed: the answer and maps below are for *{html.escape(asked)}*. Press Generate for "
            "the new prompt.")
