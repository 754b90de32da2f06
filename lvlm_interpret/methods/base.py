"""The one interface every explanation method implements, and the registry that finds methods by name."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import UserInputError
from ..trace import Trace


@dataclass
class Explanation:
    """What a method says about one answer token."""

    method: str
    token_index: int
    maps: list[np.ndarray]  # one non-negative float32 [rows, cols] map per image
    text_scores: np.ndarray | None = None  # one score per position before the token (image positions zero)
    # Other maps the method computes on the way, by name (e.g. TAM's "raw"); saved as METHOD_NAME arrays.
    variants: dict[str, list[np.ndarray]] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def all_maps(self) -> dict[str, list[np.ndarray]]:
        """The main map under the method's name, then each variant as METHOD_VARIANT."""
        return {self.method: self.maps, **{f"{self.method}_{name}": maps for name, maps in self.variants.items()}}


class ExplanationMethod:
    """Subclasses set `name` and `description` and implement `explain`; options are keyword arguments."""

    name: ClassVar[str]
    description: ClassVar[str]

    def explain(self, trace: Trace, token_index: int, model=None, **options) -> Explanation:
        raise NotImplementedError

    def explain_many(self, trace: Trace, token_indices: list[int], model=None, **options) -> list[Explanation]:
        """Several tokens at once; methods that can batch their work override this."""
        return [self.explain(trace, t, model=model, **options) for t in token_indices]

    def _options_signature(self) -> inspect.Signature | None:
        """The signature that names the options: explain's, or explain_many's where explain passes **options on."""
        signatures = [inspect.signature(function) for function in (self.explain, self.explain_many)]
        return next((s for s in signatures if all(p.kind is not p.VAR_KEYWORD for p in s.parameters.values())), None)

    def option_names(self) -> list[str]:
        signature = self._options_signature()
        return [] if signature is None else list(signature.parameters)[3:]  # after trace, token(s), model

    def check_options(self, options: dict) -> None:
        """One message when `options` holds a name the method does not take (their values it checks itself)."""
        signature = self._options_signature()
        try:
            if signature is not None:
                signature.bind(None, 0, **options)
        except TypeError as error:
            names = ", ".join(self.option_names()) or "none"
            raise UserInputError(f"{self.name}: {error}; its options are {names}") from None


METHODS: dict[str, ExplanationMethod] = {}


def register_method(cls: type[ExplanationMethod]) -> type[ExplanationMethod]:
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> ExplanationMethod:
    if name not in METHODS:
        raise UserInputError(f"unknown method {name!r}: available methods are {', '.join(sorted(METHODS))}")
    return METHODS[name]


def split_by_image(trace: Trace, scores: np.ndarray) -> list[np.ndarray]:
    """Cut a score-per-position vector into one [rows, cols] grid per image (the map's view)."""
    return [layout.gather(scores) for layout in trace.images]


def image_token_positions(trace: Trace) -> set[int]:
    """Every token the images contribute: their cells (all views) and the separators between them."""
    return {int(p) for layout in trace.images for p in layout.token_positions}


def text_only(trace: Trace, scores: np.ndarray) -> np.ndarray:
    """The same vector with image positions zeroed: what is left scores prompt and earlier answer text."""
    text = scores.astype(np.float32).copy()
    for layout in trace.images:
        positions = layout.token_positions
        text[positions[positions < len(text)]] = 0.0
    return text
