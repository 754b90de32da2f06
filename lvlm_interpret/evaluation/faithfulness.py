"""Deletion and insertion (methods.md section 6): does the model's confidence in a token follow the map?

Cells are taken in order of saliency; deletion replaces them, a few at a time, by the blurred image; insertion
pastes them into the blurred image. The score is the token's probability normalised to (p - p_blur) /
(p_orig - p_blur), and the curve's area over the fraction of cells is the metric (lower deletion, higher
insertion is better). The curve's last point is the fully deleted / fully inserted image itself.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..families.base import ImageLayout
from ..methods.visual_relevance import answer_logprobs_batch, blurred
from ..rendering import map_on_image
from ..trace import Trace


def cell_index_image(layout: ImageLayout) -> np.ndarray:
    """[height, width]: the grid cell (row-major index) each pixel of the original image falls in; -1 outside."""
    indices = np.arange(layout.n_cells, dtype=np.float32).reshape(layout.rows, layout.cols) + 1
    return map_on_image(indices, layout).round().astype(np.int64) - 1


def composite(base: np.ndarray, other: np.ndarray, cells: np.ndarray, cell_of_pixel: np.ndarray) -> Image.Image:
    """`base` with the pixels of `cells` taken from `other`."""
    chosen = np.isin(cell_of_pixel, cells)
    return Image.fromarray(np.where(chosen[..., None], other, base).astype(np.uint8), mode="RGB")


def auc(fractions: np.ndarray, scores: np.ndarray) -> float:
    """Trapezoidal area under the curve."""
    return float(np.sum((fractions[1:] - fractions[:-1]) * (scores[1:] + scores[:-1]) / 2))


def deletion_insertion(loaded, trace: Trace, token_index: int | list[int], grid_map: np.ndarray,
                       step: float = 0.02) -> dict:
    """The deletion and insertion curves and AUCs of one map for one answer token (first image)."""
    return deletion_insertion_many(loaded, trace, token_index, {"map": grid_map}, step)["map"]


def deletion_insertion_many(loaded, trace: Trace, token_index: int | list[int], maps: dict[str, np.ndarray],
                            step: float = 0.02) -> dict[str, dict]:
    """`deletion_insertion` of several maps of one token, by name: the original and blurred images are scored
    once and every map's composites go through the model in shared batches. A list of tokens is scored by their
    mean probability (an answer-level map)."""
    layout = trace.images[0]
    original = np.asarray(trace.image(0), dtype=np.uint8)
    blur = np.asarray(blurred(trace.image(0)), dtype=np.uint8)
    cell_of_pixel = cell_index_image(layout)
    counts = np.unique(np.round(np.arange(0, 1 + 1e-9, step) * layout.n_cells).astype(int))
    counts[-1] = layout.n_cells

    images = [Image.fromarray(original), Image.fromarray(blur)]
    for grid_map in maps.values():
        order = np.argsort(-np.asarray(grid_map, dtype=np.float64).ravel(), kind="stable")
        images += [composite(original, blur, order[:k], cell_of_pixel) for k in counts]  # deletion
        images += [composite(blur, original, order[:k], cell_of_pixel) for k in counts]  # insertion
    tokens = [token_index] if isinstance(token_index, int) else list(token_index)
    logprobs = answer_logprobs_batch(loaded, trace, [[image] for image in images])[:, tokens]
    probabilities = logprobs.exp().mean(1).numpy()
    p_orig, p_blur = float(probabilities[0]), float(probabilities[1])
    span = p_orig - p_blur if abs(p_orig - p_blur) > 1e-8 else 1e-8
    fractions = counts / layout.n_cells
    curves = {}
    for k, name in enumerate(maps):
        start = 2 + 2 * k * len(counts)
        scores = (probabilities[start: start + 2 * len(counts)].astype(np.float64) - p_blur) / span
        deletion, insertion = scores[: len(counts)].tolist(), scores[len(counts):].tolist()
        curves[name] = {"fractions": fractions.tolist(), "deletion": deletion, "insertion": insertion,
                        "deletion_auc": auc(fractions, np.asarray(deletion)),
                        "insertion_auc": auc(fractions, np.asarray(insertion)), "p_original": p_orig,
                        "p_blurred": p_blur}
    return curves
