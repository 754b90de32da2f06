"""Layouts with several grids per image (tiled families) and the families that make them."""

from __future__ import annotations

import numpy as np
import pytest

from lvlm_interpret.errors import UserInputError
from lvlm_interpret.families.base import ImageLayout, ImageView


def _tiled_layout() -> ImageLayout:
    """A 2x2 base grid at positions 10..13, then a 2x4 stitched grid written row by row with a newline token
    after each row (positions 14..17, 18 newline, 19..22, 23 newline)."""
    base = ImageView("base", np.arange(10, 14).reshape(2, 2), (0.0, 0.0, 80.0, 40.0))
    tiles = ImageView("tiles", np.array([[14, 15, 16, 17], [19, 20, 21, 22]]), (0.0, 0.0, 80.0, 40.0))
    return ImageLayout(views=(tiles, base), image_size=(80, 40), separators=np.array([18, 23]))


def test_gather_reads_the_maps_grid_and_other_views_by_name():
    layout = _tiled_layout()
    values = np.arange(30, dtype=np.float64)
    assert layout.gather(values).tolist() == [[14, 15, 16, 17], [19, 20, 21, 22]]
    assert layout.gather(values).dtype == np.float32
    assert layout.gather(values, view="base").tolist() == [[10, 11], [12, 13]]
    assert layout.gather(np.stack([values, -values]))[1, 0, 0] == -14  # leading axes are kept
    assert (layout.rows, layout.cols, layout.n_cells, layout.box) == (2, 4, 8, (0.0, 0.0, 80.0, 40.0))
    assert layout.cell_positions.tolist() == [10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22]
    assert layout.token_positions.tolist() == list(range(10, 24))
    assert layout.cell_of(20) == (1, 1) and layout.cell_of(18) is None and layout.cell_of(11) is None
    with pytest.raises(UserInputError, match="no 'global' view; its views are tiles, base"):
        layout.gather(values, view="global")


def test_layout_json_round_trip_and_traces_saved_before_views():
    layout = _tiled_layout()
    data = layout.to_json()
    assert data["views"][0]["runs"] == [[14, 4], [19, 4]] and data["separators"] == [[18, 1], [23, 1]]
    assert ImageLayout.from_json(data) == layout
    old = {"start": 5, "rows": 2, "cols": 3, "box": [0, 0, 30, 20], "image_size": [30, 20]}
    loaded = ImageLayout.from_json(old)
    assert loaded == ImageLayout.contiguous(5, 2, 3, (0, 0, 30, 20), (30, 20))
    assert loaded.positions.tolist() == [[5, 6, 7], [8, 9, 10]] and loaded.views[0].name == "image"
    with pytest.raises(UserInputError, match="neither 'views' nor 'start'"):
        ImageLayout.from_json({"rows": 2})
