"""Which image tokens an analysis acts on: an object's cells from a mask or a drawn box (with a patch buffer),
register-like high-norm tokens, k random tokens, or the top k of any registered explanation method.

Every selector returns sorted absolute positions in the trace's sequence."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation

from ..errors import UserInputError
from ..evaluation.metrics import cell_mask_overlap
from ..methods import get_method
from ..trace import Trace
from .hooks import run_with_cache

KINDS = ("object", "register", "random", "top")


def _layout(trace: Trace, image_index: int):
    if not 0 <= image_index < len(trace.images):
        raise UserInputError(f"image index {image_index} is out of range: the request has {len(trace.images)} images")
    return trace.images[image_index]


def cells_to_positions(trace: Trace, cells: np.ndarray, image_index: int = 0) -> list[int]:
    """A bool [rows, cols] grid of one image -> the positions of its chosen tokens."""
    return sorted(_layout(trace, image_index).positions[np.asarray(cells, dtype=bool)].tolist())


def positions_to_cells(trace: Trace, positions, image_index: int = 0) -> np.ndarray:
    return np.isin(_layout(trace, image_index).positions, list(positions))


def grow(cells: np.ndarray, buffer: int) -> np.ndarray:
    """The cells plus every cell within `buffer` cells of them (a square neighbourhood, diagonals included)."""
    if buffer < 0:
        raise UserInputError(f"the patch buffer must be 0 or more, got {buffer}")
    cells = np.asarray(cells, dtype=bool)
    if buffer == 0 or not cells.any():
        return cells
    return binary_dilation(cells, structure=np.ones((3, 3), dtype=bool), iterations=buffer)


def box_mask(image_size: tuple[int, int], box) -> np.ndarray:
    """A [height, width] mask of a drawn rectangle (x0, y0, x1, y1) in the original image's pixels."""
    width, height = image_size
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise UserInputError(f"a box is four numbers x0,y0,x1,y1 in image pixels, got {box!r}") from None
    if not (x0 < x1 and y0 < y1 and x1 > 0 and y1 > 0 and x0 < width and y0 < height):
        raise UserInputError(f"the box {x0:g},{y0:g},{x1:g},{y1:g} is empty or outside the {width}x{height} image: "
                             "give x0 < x1 and y0 < y1 inside the image")
    mask = np.zeros((height, width), dtype=bool)
    mask[max(int(y0), 0):int(np.ceil(y1)), max(int(x0), 0):int(np.ceil(x1))] = True
    return mask


def object_tokens(trace: Trace, mask: np.ndarray, buffer: int = 0, image_index: int = 0) -> list[int]:
    """Tokens whose patch overlaps the object's mask ([height, width] of the original image), grown by
    `buffer` patches (0, 1, 2 in the paper)."""
    layout = _layout(trace, image_index)
    mask = np.asarray(mask, dtype=bool)
    width, height = layout.image_size
    if mask.shape != (height, width):
        raise UserInputError(f"the mask is {mask.shape[1]}x{mask.shape[0]} pixels but the image is {width}x{height}: "
                             "give a mask the size of the image")
    cells = grow(cell_mask_overlap(layout, mask) > 0, buffer)
    if not cells.any():
        raise UserInputError("the mask covers no image token: it is empty or outside the region the model sees")
    return cells_to_positions(trace, cells, image_index)


def image_embedding_norms(loaded, trace: Trace, image_index: int = 0) -> np.ndarray:
    """[rows, cols]: the norm of each image token's LM-input embedding."""
    layout = _layout(trace, image_index)
    _, cache = run_with_cache(loaded, trace, ["lm.hook_embed"])
    return cache["lm.hook_embed"][0].float().norm(dim=-1).cpu().numpy()[layout.positions]


def register_tokens(loaded, trace: Trace, image_index: int = 0, sigmas: float = 2.0) -> list[int]:
    """Register-like tokens: LM-input embedding norm above the image's mean + `sigmas` standard deviations."""
    norms = image_embedding_norms(loaded, trace, image_index)
    chosen = norms > norms.mean() + sigmas * norms.std()
    return cells_to_positions(trace, chosen, image_index)


def _check_k(k, n_tokens: int) -> int:
    if k is None or not 1 <= int(k) <= n_tokens:
        raise UserInputError(f"k must be between 1 and the image's {n_tokens} tokens, got {k}")
    return int(k)


def random_tokens(trace: Trace, k: int, seed: int = 0, image_index: int = 0, exclude=()) -> list[int]:
    """k tokens drawn without replacement (reproducible by `seed`), avoiding `exclude` when it leaves enough."""
    layout = _layout(trace, image_index)
    k = _check_k(k, layout.n_cells)
    if seed < 0:
        raise UserInputError(f"the seed of the random set must be 0 or more, got {seed}")
    every = layout.positions.ravel()
    pool = every[~np.isin(every, list(exclude))]
    if len(pool) < k:
        pool = every
    return sorted(np.random.default_rng(seed).choice(pool, size=k, replace=False).tolist())


def top_tokens(loaded, trace: Trace, method: str, k: int, token_index: int = 0, image_index: int = 0) -> list[int]:
    """The k highest cells of a registered method's map of answer token `token_index`."""
    layout = _layout(trace, image_index)
    k = _check_k(k, layout.n_cells)
    grid = get_method(method).explain(trace, token_index, model=loaded).maps[image_index]
    order = np.argsort(-grid.ravel(), kind="stable")[:k]
    return sorted(layout.positions.ravel()[order].tolist())


def select_tokens(loaded, trace: Trace, kind: str, *, mask=None, box=None, buffer: int = 0, k=None, seed: int = 0,
                  method: str | None = None, token_index: int = 0, image_index: int = 0) -> list[int]:
    """One entry point for the CLI, the service and the web panel."""
    if kind == "object":
        if (mask is None) == (box is None):
            raise UserInputError("object tokens need exactly one of a mask or a box")
        if box is not None:
            mask = box_mask(_layout(trace, image_index).image_size, box)
        return object_tokens(trace, mask, buffer, image_index)
    if kind == "register":
        return register_tokens(loaded, trace, image_index)
    if kind == "random":
        return random_tokens(trace, k, seed, image_index)
    if kind == "top":
        if not method:
            raise UserInputError("top-k tokens need a method, e.g. tam or relevancy")
        return top_tokens(loaded, trace, method, k, token_index, image_index)
    raise UserInputError(f"unknown token set {kind!r}: choose one of {', '.join(KINDS)}")
