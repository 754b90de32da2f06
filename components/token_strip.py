"""The answer as a strip of clickable tokens; the selected one is highlighted, visually relevant ones marked."""

from __future__ import annotations

import gradio as gr

from lvlm_interpret import TraceView

SELECTED = "selected"
VISUAL = "looks at image"


def build() -> gr.HighlightedText:
    return gr.HighlightedText(label="Answer: click a word to see where the model looked for it. Blue: words that "
                                    "depend on seeing the image (their likelihood drops when the image is blurred)",
                              color_map={SELECTED: "#f59e0b", VISUAL: "#93c5fd"}, show_legend=False,
                              show_inline_category=False, interactive=False, elem_id="answer-tokens")


def strip_value(trace: TraceView, selected: int | None,
                relevant: list[bool] | None = None) -> list[tuple[str, str | None]]:
    """One entry per answer token, by position (repeated words stay distinct)."""
    relevant = relevant or [False] * len(trace.answer_texts)
    return [(text if text.strip() else repr(text),
             SELECTED if index == selected else VISUAL if relevant[index] else None)
            for index, text in enumerate(trace.answer_texts)]
