import numpy as np
import pytest

from lvlm_interpret.evaluation.metrics import cell_mask_overlap, obj_iou, pointing_hit, share_inside
from lvlm_interpret.families.base import ImageLayout

LAYOUT = ImageLayout.contiguous(0, 4, 4, box=(0, 0, 80, 80), image_size=(80, 80))


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


def test_func_iou_and_f1():
    from lvlm_interpret.evaluation.metrics import f1_iou, func_iou

    nothing, everywhere = np.zeros((4, 4)), np.ones((4, 4))
    one_cell = np.zeros((4, 4))
    one_cell[0, 0] = 1.0
    assert func_iou(nothing, LAYOUT, 0.5) == 1.0 and func_iou(everywhere, LAYOUT, 0.5) == 0.0
    assert 0.8 < func_iou(one_cell, LAYOUT, 0.5) < 1.0  # it lights one of 16 cells (smoothed)
    assert f1_iou(0.5, 1.0) == pytest.approx(2 * 0.5 / 1.5) and f1_iou(0, 0) == 0.0


def test_deletion_and_insertion_curves(llava_trace, qwen2_vl, qwen_trace):
    from lvlm_interpret.evaluation.faithfulness import auc, cell_index_image, deletion_insertion

    cells = cell_index_image(llava_trace.images[0])
    assert cells.max() == llava_trace.images[0].n_cells - 1 and (cells[:, :10] == -1).all()  # crop: sides unseen
    layout = qwen_trace.images[0]  # Qwen's grid covers the whole image, so the curves' ends are exact
    grid = np.random.default_rng(0).random((layout.rows, layout.cols))
    curves = deletion_insertion(qwen2_vl, qwen_trace, 1, grid, step=0.25)
    fractions = curves["fractions"]  # steps of a quarter of the cells, rounded to whole cells
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and len(fractions) == 5
    assert np.allclose(np.diff(fractions), 0.25, atol=1 / layout.n_cells)
    # the ends are the original image (1) and the fully blurred image (0), in both directions
    assert curves["deletion"][0] == pytest.approx(1.0, abs=1e-4) and curves["deletion"][-1] == pytest.approx(0, abs=1e-4)
    assert curves["insertion"][0] == pytest.approx(0, abs=1e-4) and curves["insertion"][-1] == pytest.approx(1, abs=1e-4)
    assert auc(np.array([0.0, 1.0]), np.array([1.0, 0.0])) == 0.5  # no constant added at the last step
