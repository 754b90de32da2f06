"""Raw attention (LVLM-Interpret): the answer token's attention row over the image tokens, on the image grid."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserInputError
from ..trace import Trace
from .base import Explanation, ExplanationMethod, register_method, split_by_image, text_only

AGGREGATIONS = ("mean", "max")


def parse_selection(spec, count: int, what: str) -> list[int]:
    """`all`, one index `3`, an inclusive range `2-5` or a list `1,4` -> sorted indices in [0, count)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(count))
    if isinstance(spec, int):
        indices = [spec]
    elif isinstance(spec, (list, tuple)):
        indices = [int(i) for i in spec]
    else:
        indices = []
        try:
            for part in str(spec).split(","):
                first, _, last = part.strip().partition("-")
                indices.extend(range(int(first), int(last) + 1) if last else [int(first)])
        except ValueError:
            raise UserInputError(f"{what} must be 'all', an index like 3, a range like 2-5 or a list like 1,4; "
                                 f"got {spec!r}") from None
    bad = [i for i in indices if not 0 <= i < count]
    if bad or not indices:
        raise UserInputError(f"{what} {spec!r} is out of range: the model has {count} {what}s (0..{count - 1})")
    return sorted(set(indices))


def _reduce(values: torch.Tensor, aggregation: str, dim: int) -> torch.Tensor:
    if aggregation not in AGGREGATIONS:
        raise UserInputError(f"unknown aggregation {aggregation!r}: use {' or '.join(AGGREGATIONS)}")
    return values.mean(dim) if aggregation == "mean" else values.amax(dim)


def attention_scores(trace: Trace, token_index: int, layers="all", heads="all", aggregation="mean") -> torch.Tensor:
    """[layers, heads] of the token's source row -> one score per key position (heads first, then layers)."""
    trace.check_token_index(token_index)
    layer_ids = parse_selection(layers, trace.n_layers, "layer")
    head_ids = parse_selection(heads, trace.n_heads, "head")
    rows = trace.attention[token_index][layer_ids][:, head_ids].float()
    return _reduce(_reduce(rows, aggregation, dim=1), aggregation, dim=0)


@register_method
class RawAttention(ExplanationMethod):
    name = "attention"
    description = "Raw attention of the token's source position over the image tokens (layers/heads aggregated)."

    def explain(self, trace, token_index, model=None, layers: str | int | list = "all", heads: str | int | list = "all",
                aggregation: str = "mean"):
        scores = attention_scores(trace, token_index, layers, heads, aggregation).numpy()
        return Explanation(
            method=self.name,
            token_index=token_index,
            maps=split_by_image(trace, scores),
            text_scores=text_only(trace, scores[: trace.source_position(token_index) + 1]),
            details={"layers": layers, "heads": heads, "aggregation": aggregation},
        )


def reverse_attention(trace: Trace, cells: list[tuple[int, int]], image_index: int = 0, layers="all",
                      heads="all", aggregation="mean") -> np.ndarray:
    """For chosen image cells, one score per answer token: the attention it pays to those cells."""
    if not 0 <= image_index < len(trace.images):
        raise UserInputError(f"image index {image_index} is out of range: the request has {len(trace.images)} images")
    layout = trace.images[image_index]
    if not cells:
        raise UserInputError("choose at least one image cell for the reverse view")
    for row, col in cells:
        if not (0 <= row < layout.rows and 0 <= col < layout.cols):
            raise UserInputError(f"cell ({row}, {col}) is outside the {layout.rows}x{layout.cols} grid")
    positions = [int(layout.positions[row, col]) for row, col in cells]
    return np.array([
        float(attention_scores(trace, t, layers, heads, aggregation)[positions].sum()) for t in range(trace.n_answer)
    ], dtype=np.float32)


def attention_overview(trace: Trace, token_index: int) -> dict[str, np.ndarray]:
    """Layer x head attention mass of the token's source row on image tokens, prompt text and earlier answer."""
    trace.check_token_index(token_index)
    rows = trace.attention[token_index].float()  # [layers, heads, keys]
    image = torch.zeros(rows.shape[-1], dtype=torch.bool)
    for layout in trace.images:
        image[torch.from_numpy(layout.token_positions)] = True
    prompt = torch.zeros_like(image)
    prompt[: trace.prompt_length] = True
    return {
        "image": rows[..., image].sum(-1).numpy(),
        "prompt_text": rows[..., prompt & ~image].sum(-1).numpy(),
        "answer": rows[..., ~prompt].sum(-1).numpy(),
    }
