"""Localisation metrics of one map against one object mask (methods.md section 6)."""

from __future__ import annotations

import numpy as np
from skimage.filters import threshold_otsu

from ..families.base import ImageLayout
from ..rendering import map_on_image


def cell_mask_overlap(layout: ImageLayout, mask: np.ndarray) -> np.ndarray:
    """[rows, cols]: the fraction of each grid cell's pixels (inside the image) that belong to the mask."""
    rows, cols = layout.rows, layout.cols
    cell_index = map_on_image(np.arange(1, rows * cols + 1, dtype=np.float32).reshape(rows, cols), layout)
    cell_index = cell_index.round().astype(np.int64).ravel()
    total = np.bincount(cell_index, minlength=rows * cols + 1)[1:]
    inside = np.bincount(cell_index, weights=mask.ravel().astype(np.float64), minlength=rows * cols + 1)[1:]
    return np.divide(inside, total, out=np.zeros(rows * cols), where=total > 0).reshape(rows, cols)


def pointing_hit(grid_map: np.ndarray, layout: ImageLayout, mask: np.ndarray) -> bool:
    """Pointing game: the map's highest cell contains part of the object (a constant map points nowhere)."""
    grid_map = np.asarray(grid_map)
    if not np.isfinite(grid_map).all() or grid_map.max() <= grid_map.min():
        return False
    row, col = np.unravel_index(int(np.argmax(grid_map)), grid_map.shape)
    return bool(cell_mask_overlap(layout, mask)[row, col] > 0)


def obj_iou(grid_map: np.ndarray, layout: ImageLayout, mask: np.ndarray) -> float:
    """Obj-IoU (TAM protocol): the map upsampled to the image, binarised at Otsu's threshold, IoU with the mask."""
    upsampled = map_on_image(grid_map, layout, smooth=True)
    if upsampled.max() <= upsampled.min():
        return 0.0
    foreground = upsampled > threshold_otsu(upsampled)
    union = np.logical_or(foreground, mask).sum()
    return float(np.logical_and(foreground, mask).sum() / union) if union else 0.0


def share_inside(cells: list[tuple[int, int]], layout: ImageLayout, mask: np.ndarray) -> float | None:
    """The share of chosen grid cells that overlap the object's mask (None when no cell was chosen)."""
    if not cells:
        return None
    overlap = cell_mask_overlap(layout, mask)
    return float(np.mean([overlap[row, col] > 0 for row, col in cells]))


def otsu_threshold(grid_map: np.ndarray, layout: ImageLayout) -> float | None:
    """Otsu's threshold of the map scaled to [0, 1] and upsampled to the image (None for a flat map)."""
    upsampled = map_on_image(grid_map, layout, smooth=True)
    top = upsampled.max()
    if top <= upsampled.min():
        return None
    return float(threshold_otsu(upsampled / top))


def func_iou(grid_map: np.ndarray, layout: ImageLayout, noun_threshold: float) -> float:
    """Func-IoU of a function word's map: the share of the image it leaves below the nouns' mean foreground
    threshold (maps scaled to [0, 1]); 1 for a map that lights nothing."""
    upsampled = map_on_image(grid_map, layout, smooth=True)
    top = upsampled.max()
    if top <= 0:
        return 1.0
    return float(np.mean(upsampled / top < noun_threshold))


def f1_iou(obj: float, func: float) -> float:
    return 2 * obj * func / (obj + func) if obj + func > 0 else 0.0
