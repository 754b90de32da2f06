"""The one interface every explanation method implements, and the registry that finds methods by name."""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .. import notebook
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

    def show(self, trace: Trace, map_name: str | None = None, image_index: int = 0, **options) -> notebook.MapView:
        """A map (default the method's own) blended on `trace`'s image with a colour bar and a caption, for a
        notebook (`_repr_html_` / `_repr_png_`) or `.save(path)`; `options`: alpha, smooth."""
        return notebook.MapView(trace, self, map_name, image_index, **options)

    def __repr__(self) -> str:
        return notebook.explanation_repr(self)

    def _repr_html_(self) -> str:
        return notebook.explanation_html(self)


class ExplanationMethod:
    """Subclasses set `name` and `description` and implement `explain`; options are keyword arguments."""

    name: ClassVar[str]
    description: ClassVar[str]
    # seconds per token even on the demo model (an optimisation): views of "every method" leave it out unless asked
    slow: ClassVar[bool] = False

    def explain(self, trace: Trace, token_index: int, model=None, **options) -> Explanation:
        raise NotImplementedError

    def explain_many(self, trace: Trace, token_indices: list[int], model=None, **options) -> list[Explanation]:
        """Several tokens at once; methods that can batch their work override this."""
        return [self.explain(trace, t, model=model, **options) for t in token_indices]

    def _options_function(self):
        """The function whose signature names the options: explain, or explain_many where explain passes
        **options on."""
        return next((function for function in (self.explain, self.explain_many)
                     if all(p.kind is not p.VAR_KEYWORD for p in inspect.signature(function).parameters.values())),
                    None)

    def option_names(self) -> list[str]:
        function = self._options_function()
        # the parameters after trace, token index(es) and model
        return [] if function is None else list(inspect.signature(function).parameters)[3:]

    def check_options(self, options: dict) -> None:
        """One message for an option the method does not take, or a value of another type than its annotation
        (true / false for bool, a whole number for int, ...); finer checks of values are the method's own."""
        names = self.option_names()
        hints = typing.get_type_hints(self._options_function()) if names else {}
        for name, value in options.items():
            if name not in names:
                raise UserInputError(f"{self.name} has no option {name!r}; its options are "
                                     f"{', '.join(names) or 'none'}")
            if name in hints and not _accepts(value, hints[name]):
                raise UserInputError(f"{self.name}: option {name} must be {_describe(hints[name])}, got {value!r}")


def _accepts(value, hint) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(value, member) for member in typing.get_args(hint))
    hint = typing.get_origin(hint) or hint
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(member) for member in typing.get_args(hint))
    hint = typing.get_origin(hint) or hint
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text", list: "a list",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


METHODS: dict[str, ExplanationMethod] = {}


def register_method(cls: type[ExplanationMethod]) -> type[ExplanationMethod]:
    METHODS[cls.name] = cls()
    return cls


def quick_methods() -> list[str]:
    """The registered methods that are not `slow`, sorted: what views of every method compute unasked."""
    return sorted(name for name, method in METHODS.items() if not method.slow)


def get_method(name: str) -> ExplanationMethod:
    if name not in METHODS:
        raise UserInputError(f"unknown method {name!r}: available methods are {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_method_options(options) -> dict[str, dict]:
    """Options per method name ({"cleann": {"head": 0}}), checked: one message for anything else."""
    if not isinstance(options, dict) or not all(isinstance(given, dict) for given in options.values()):
        raise UserInputError('method options must map method names to their options, e.g. {"cleann": {"head": 0}}')
    for method, given in options.items():
        get_method(method).check_options(given)
    return options


def split_by_image(trace: Trace, scores: np.ndarray) -> list[np.ndarray]:
    """Cut a score-per-position vector into one [rows, cols] grid per image (the map's view)."""
    return [layout.gather(scores) for layout in trace.images]


def image_cell_positions(trace: Trace) -> np.ndarray:
    """Every image's grid cells (all views), in order."""
    return np.concatenate([layout.cell_positions for layout in trace.images])


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
