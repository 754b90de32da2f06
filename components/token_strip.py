"""The answer as a strip of clickable tokens; the selected one is highlighted."""

from __future__ import annotations

import gradio as gr

from lvlm_interpret import Trace

SELECTED = "selected"


def build() -> gr.HighlightedText:
    return gr.HighlightedText(label="Answer tokens (click one)", color_map={SELECTED: "#f59e0b"},
                              show_legend=False, show_inline_category=False, interactive=False,
                              elem_id="answer-tokens")


def strip_value(trace: Trace, selected: int | None) -> list[tuple[str, str | None]]:
    """One entry per answer token, by position (repeated words stay distinct)."""
    return [(text if text.strip() else repr(text), SELECTED if index == selected else None)
            for index, text in enumerate(trace.answer_texts)]
