import numpy as np
import pytest

from lvlm_interpret.evaluation.metrics import cell_mask_overlap, obj_iou, pointing_hit, share_inside
from lvlm_interpret.families.base import ImageLayout

LAYOUT = ImageLayout(start=0, rows=4, cols=4, box=(0, 0, 80, 80), image_size=(80, 80))


def _square_mask(x0, y0, x1, y1):
    mask = np.zeros((80, 80), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_cell_overlap_fractions():
    overlap = cell_mask_overlap(LAYOUT, _square_mask(0, 0, 30, 20))  # cells are 20x20 px
    assert overlap[0, 0] == 1.0 and overlap[0, 1] == pytest.approx(0.5) and overlap[1, 0] == 0.0


def test_pointing_game():
    mask = _square_mask(40, 40, 60, 60)  # cell (2, 2)
    grid = np.zeros((4, 4))
    grid[2, 2] = 1.0
    assert pointing_hit(grid, LAYOUT, mask)
    grid[0, 3] = 2.0
    assert not pointing_hit(grid, LAYOUT, mask)
    assert not pointing_hit(np.ones((4, 4)), LAYOUT, mask)  # a flat map points nowhere


def test_obj_iou_with_otsu():
    mask = _square_mask(20, 20, 60, 60)  # cells (1..2, 1..2)
    grid = np.zeros((4, 4))
    grid[1:3, 1:3] = 1.0
    assert obj_iou(grid, LAYOUT, mask) > 0.8
    assert obj_iou(np.zeros((4, 4)), LAYOUT, mask) == 0.0
    off = np.zeros((4, 4))
    off[3, 3] = 1.0
    assert obj_iou(off, LAYOUT, mask) < 0.05


def test_share_inside():
    mask = _square_mask(0, 0, 20, 20)
    assert share_inside([(0, 0), (3, 3)], LAYOUT, mask) == 0.5
    assert share_inside([], LAYOUT, mask) is None
