"""Attention knockout (Geva et al. 2023, as used by Neo et al. 2025): block attention from chosen query positions
(by default the one that predicts the target token) to a set of tokens over a window of consecutive LM layers,
and measure how much the target token's probability drops.

The block is written into the mask each attention receives (`lm.blocks.L.attn.hook_mask`): a bool mask gets
False, an additive float mask gets the dtype's minimum (writing False or 0 into a float mask would do nothing)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import plotly.graph_objects as go
import torch

from .. import notebook
from ..errors import UserInputError
from ..trace import Trace
from .hooks import run_with_hooks

# The paper's windows on a 32-layer model (L1-10, L5-14, L11-20, L15-24, L21-31), as fractions of the depth.
WINDOWS = {
    "early": (0.0, 10 / 32),
    "early-middle": (4 / 32, 14 / 32),
    "middle": (10 / 32, 20 / 32),
    "middle-late": (14 / 32, 24 / 32),
    "late": (20 / 32, 1.0),
}


def window_layers(window: str, n_layers: int) -> list[int]:
    """A named window's layers scaled to `n_layers`, or a custom one: "L" or "A-B" (inclusive)."""
    if window in WINDOWS:
        low, high = WINDOWS[window]
        start = int(low * n_layers)
        return list(range(start, max(start + 1, round(high * n_layers))))
    try:
        first, _, last = window.partition("-")
        first, last = int(first), int(last or first)
    except ValueError:
        raise UserInputError(f"unknown layer window {window!r}: use {', '.join(WINDOWS)} or a range like 2-5") from None
    if not 0 <= first <= last < n_layers:
        raise UserInputError(f"layer window {window!r} is out of range: the model has {n_layers} layers "
                             f"(0-{n_layers - 1})")
    return list(range(first, last + 1))


def block_attention(mask: torch.Tensor, queries: list[int], keys: list[int]) -> torch.Tensor:
    """A copy of a 4D mask [batch, 1 or heads, q, k] in which the absolute query positions `queries` may not
    attend to `keys`. With a KV cache the mask's rows are the last q positions of the k keys."""
    offset = mask.shape[-1] - mask.shape[-2]
    rows = torch.tensor([q - offset for q in queries if 0 <= q - offset < mask.shape[-2]], dtype=torch.long)
    columns = torch.tensor([k for k in keys if k < mask.shape[-1]], dtype=torch.long)
    blocked = mask.clone()
    if len(rows) and len(columns):
        fill = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        blocked[..., rows[:, None], columns[None, :]] = fill
    return blocked


def knockout_hooks(layers: list[int], queries: list[int], keys: list[int]):
    def hook(mask, name):
        return block_attention(mask, queries, keys)
    return [(f"lm.blocks.{layer}.attn.hook_mask", hook) for layer in layers]


@dataclass
class WindowResult:
    window: str
    layers: list[int]
    prob: float
    still_argmax: bool


@dataclass
class KnockoutResult:
    token_index: int
    target: str
    queries: list[int]
    keys: list[int]
    prob_before: float
    windows: list[WindowResult]

    def __repr__(self) -> str:
        return notebook.knockout_repr(self)

    def _repr_html_(self) -> str:
        return notebook.knockout_html(self)

    def drops(self) -> list[float]:
        """Relative probability drop per window: (p_before - p_after) / p_before."""
        return [(self.prob_before - w.prob) / self.prob_before if self.prob_before > 0 else 0.0
                for w in self.windows]

    def to_json(self) -> dict:
        return {**asdict(self), "relative_drop": [round(d, 6) for d in self.drops()]}

    @classmethod
    def from_json(cls, data: dict) -> "KnockoutResult":
        fields = {k: v for k, v in data.items() if k != "relative_drop"}
        return cls(**{**fields, "windows": [WindowResult(**w) for w in data["windows"]]})


def _probability(loaded, trace: Trace, token_index: int, hooks) -> tuple[float, bool]:
    row = run_with_hooks(loaded, trace, hooks).logits[0, trace.source_position(token_index)].float()
    token = trace.answer_ids[token_index]
    return float(torch.softmax(row, -1)[token]), bool(row.argmax() == token)


def knockout(loaded, trace: Trace, keys: list[int], token_index: int = 0, queries: list[int] | None = None,
             windows: list[str] | tuple[str, ...] = tuple(WINDOWS)) -> KnockoutResult:
    """For each window, block attention from `queries` (default: the position predicting answer token
    `token_index`) to `keys` in the window's layers and re-score the token (teacher-forced)."""
    source = trace.source_position(token_index)
    queries = [source] if queries is None else sorted(set(queries))
    if not keys:
        raise UserInputError("knockout needs a non-empty set of tokens to block")
    keys = sorted(set(keys))
    if not queries or any(not 0 <= q <= source for q in queries):
        raise UserInputError(f"query positions must lie in 0..{source} (up to the position predicting the token)")
    # a query attends only to itself and earlier positions: later ones are blocked already, and negative ones
    # would count from the end of the sequence
    last = max(queries)
    outside = [k for k in keys if not 0 <= k < last]
    if outside:
        before = f"the position predicting answer token {token_index}" if queries == [source] else "the last query"
        raise UserInputError(f"knockout positions must lie in 0..{last - 1}, before {before} ({last}); "
                             f"{outside[0]} does not")
    if set(queries) & set(keys):
        raise UserInputError("a query position may not block attention to itself")
    if not windows:
        raise UserInputError("name at least one layer window")
    n_layers = len(loaded.family.language_layers(loaded.model))
    prob_before, _ = _probability(loaded, trace, token_index, [])
    results = []
    for window in windows:
        layers = window_layers(window, n_layers)
        prob, still_argmax = _probability(loaded, trace, token_index, knockout_hooks(layers, queries, keys))
        results.append(WindowResult(window, layers, prob, still_argmax))
    return KnockoutResult(token_index, trace.answer_texts[token_index], queries, keys, prob_before, results)


def layer_span(layers: list[int]) -> str:
    """Layers as a reader says them: "layer 3" or "layers 0-5"."""
    return f"layer {layers[0]}" if layers[0] == layers[-1] else f"layers {layers[0]}-{layers[-1]}"


def knockout_figure(result: KnockoutResult, title: str = "") -> go.Figure:
    """Relative probability drop of the target token per layer window."""
    labels = [f"{w.window}<br>{layer_span(w.layers)}" for w in result.windows]
    figure = go.Figure(go.Bar(x=labels, y=[100 * d for d in result.drops()],
                              customdata=[w.prob for w in result.windows],
                              hovertemplate="%{x}<br>drop %{y:.1f}%<br>p after %{customdata:.4f}<extra></extra>"))
    figure.update_yaxes(title="probability drop (%)")
    figure.update_layout(title=title or f"Knockout of {len(result.keys)} tokens: p({result.target.strip()!r}) "
                                       f"{result.prob_before:.3f} before",
                         height=300, margin=dict(l=10, r=10, t=40, b=10))
    return figure
