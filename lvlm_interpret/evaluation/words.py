"""Answer tokens grouped into words, so that metrics are word-level whatever the tokenizer splits."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from ..methods.visual_relevance import STOP_WORDS


@dataclass(frozen=True)
class Word:
    text: str  # lower-case, stripped
    tokens: tuple[int, ...]  # answer-token indices of its sub-tokens

    @property
    def is_function_word(self) -> bool:
        return self.text in STOP_WORDS


def _is_punctuation(text: str) -> bool:
    return bool(text) and all(unicodedata.category(ch)[0] == "P" for ch in text)


def answer_words(tokenizer, answer_ids: list[int]) -> list[Word]:
    """Words of the answer, in order. A token starts a new word where its decoded text begins with a space (found by
    decoding growing prefixes, which works for SentencePiece, byte-level BPE and word-level tokenizers alike) or
    where it or the previous token is punctuation. Special tokens and punctuation are not words."""
    pieces, previous = [], ""
    special = set(tokenizer.all_special_ids)
    for k in range(len(answer_ids)):
        text = tokenizer.decode(answer_ids[: k + 1], skip_special_tokens=True)
        pieces.append(text[len(previous):] if text.startswith(previous) else tokenizer.decode([answer_ids[k]]))
        previous = text
    words: list[tuple[str, list[int]]] = []
    for k, piece in enumerate(pieces):
        stripped = piece.strip()
        if answer_ids[k] in special or not stripped:
            continue
        starts_word = (not words or piece[:1].isspace() or _is_punctuation(stripped)
                       or _is_punctuation(words[-1][0]) or words[-1][1][-1] != k - 1)
        if starts_word:
            words.append((stripped, [k]))
        else:
            words[-1] = (words[-1][0] + stripped, words[-1][1] + [k])
    return [Word(text.lower(), tuple(tokens)) for text, tokens in words if not _is_punctuation(text)]
