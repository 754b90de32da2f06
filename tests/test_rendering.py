import numpy as np
import pytest

from lvlm_interpret import UserInputError
from lvlm_interpret.families.base import ImageLayout
from lvlm_interpret.rendering import (
    blend, captioned_map, colour_lookup, map_caption, map_label, normalise, overlay, scale_bar, scale_labels,
)


def test_overlay_is_the_original_size_and_covers_only_the_box():
    layout = ImageLayout.contiguous(0, 2, 2, box=(50.0, 0.0, 150.0, 100.0), image_size=(200, 100))
    grid = np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32)
    image = overlay(grid, layout, alpha=0.5)
    assert image.size == (200, 100) and image.mode == "RGBA"
    alpha = np.asarray(image)[..., 3]
    assert not alpha[:, :50].any() and not alpha[:, 150:].any()
    assert (alpha[:, 50:150] == 128).all()
    pixels = np.asarray(image)[..., :3].astype(int)
    # brighter colour where the map is higher (inferno is dark at 0, bright at 1)
    assert pixels[25, 125].sum() > pixels[25, 75].sum()


def test_ignore_top_saturates_sinks_and_rescales_the_rest():
    grid = np.array([[100.0, 1.0], [0.5, 0.0]])
    assert normalise(grid)[0, 1] == pytest.approx(0.01)
    scaled = normalise(grid, ignore_top=1)
    assert scaled[0, 0] == 1.0 and scaled[0, 1] == 1.0 and scaled[1, 0] == pytest.approx(0.5)
    assert not normalise(np.zeros((2, 2))).any()


def test_blend_keeps_the_image_size(scene):
    layout = ImageLayout.contiguous(0, 3, 4, box=(0, 0, *scene.size), image_size=scene.size)
    assert blend(scene, overlay(np.random.rand(3, 4), layout)).size == scene.size


def _figure_parts(image, figure):
    """The figure's blended image (top, the image's size) and the strip below it (colour bar, then caption)."""
    pixels = np.asarray(figure).astype(int)
    return pixels[: image.height], pixels[image.height:]


def _ink_rows(strip):
    """Rows of a white strip that hold dark (text or tick) pixels."""
    return np.flatnonzero((strip.sum(-1) < 200).any(axis=1))


def test_captioned_map_is_the_blend_with_a_colour_bar_and_caption_below(scene):
    layout = ImageLayout.contiguous(0, 3, 4, box=(0, 0, *scene.size), image_size=scene.size)
    grid = np.random.default_rng(0).random((3, 4)).astype(np.float32)
    figure = captioned_map(scene, grid, layout, "\u201ccat\u201d \u00b7 TAM (raw, before interference removal)")
    assert figure.width == scene.width and figure.height > scene.height
    top, below = _figure_parts(scene, figure)
    assert np.array_equal(top, np.asarray(blend(scene, overlay(grid, layout))))
    # the colour strip runs from the scale's bottom colour to its top colour, left to right
    lookup = colour_lookup().astype(int)
    strip_row = next(row for row in below if (np.abs(row - lookup[0]).sum(-1) < 30).any())
    assert (np.abs(strip_row - lookup[-1]).sum(-1) < 30).any()
    # text below the strip: the scale's values and the caption, each in its own band
    bar_height = scale_bar(0.0, float(grid.max()), scene.width).height
    assert len(_ink_rows(below[:bar_height])) > 0 and len(_ink_rows(below[bar_height:])) > 0
    other = captioned_map(scene, grid, layout, "\u201cdog\u201d \u00b7 Relevancy through the vision tower")
    assert np.array_equal(np.asarray(other)[: scene.height + bar_height], np.asarray(figure)[: scene.height + bar_height])
    assert not np.array_equal(np.asarray(other), np.asarray(figure))


def test_colour_bar_prints_the_scale_it_colours_by():
    assert scale_labels(0.0, 0.5) == ["0", "0.25", "0.5"]
    own, doubled = scale_bar(0.0, 0.5, 300), scale_bar(0.0, 1.0, 300)
    assert own.size == doubled.size and not np.array_equal(np.asarray(own), np.asarray(doubled))
    with pytest.raises(UserInputError, match="maximum"):
        normalise(np.ones((2, 2)), vmin=1.0, vmax=1.0)


def test_a_shared_scale_changes_the_colours_and_the_bar(scene):
    layout = ImageLayout.contiguous(0, 1, 2, box=(0, 0, *scene.size), image_size=scene.size)
    grid = np.array([[0.5, 1.0]], dtype=np.float32)
    own = captioned_map(scene, grid, layout, "own scale", alpha=1.0)
    shared = captioned_map(scene, grid, layout, "shared scale", vmin=0.0, vmax=2.0, alpha=1.0)
    lookup = colour_lookup().astype(int)
    right_cell = (scene.height // 2, scene.width * 3 // 4)
    assert np.array_equal(np.asarray(own)[right_cell], lookup[255])  # the map's own maximum: the top colour
    assert np.array_equal(np.asarray(shared)[right_cell], lookup[128])  # half of the shared maximum
    bar = slice(scene.height, scene.height + scale_bar(0.0, 1.0, scene.width).height)
    assert not np.array_equal(np.asarray(own)[bar], np.asarray(shared)[bar])


def test_opacity_and_smoothing_are_options(scene):
    layout = ImageLayout.contiguous(0, 2, 2, box=(0, 0, *scene.size), image_size=scene.size)
    grid = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    assert np.array_equal(np.asarray(captioned_map(scene, grid, layout, "x", alpha=0.0))[: scene.height],
                          np.asarray(scene.convert("RGB")))
    exact = np.asarray(captioned_map(scene, grid, layout, "x", alpha=1.0))[: scene.height]
    smooth = np.asarray(captioned_map(scene, grid, layout, "x", alpha=1.0, smooth=True))[: scene.height]
    lookup = colour_lookup()
    assert len({tuple(p) for p in exact.reshape(-1, 3)} - {tuple(c) for c in lookup[[0, 255]]}) == 0
    assert len({tuple(p) for p in smooth.reshape(-1, 3)}) > 2
    with pytest.raises(UserInputError, match="opacity"):
        captioned_map(scene, grid, layout, "x", alpha=1.5)


def test_wider_figures_keep_the_aspect_ratio_and_sharp_cells(scene):
    layout = ImageLayout.contiguous(0, 2, 2, box=(0, 0, *scene.size), image_size=scene.size)
    grid = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    figure = captioned_map(scene, grid, layout, "x", alpha=1.0, width=scene.width * 3)
    assert figure.width == scene.width * 3
    picture = np.asarray(figure)[: scene.height * 3]
    assert {tuple(p) for p in picture.reshape(-1, 3)} <= {tuple(c) for c in colour_lookup()[[0, 255]]}


def test_map_labels_say_what_each_map_shows():
    assert map_label("tam_raw") == "TAM (raw, before interference removal)"
    assert "vision tower" in map_label("relevancy_vit") and map_label("something_new") == "something_new"
    assert map_caption(" cat", "attention", {"layers": "3", "heads": "2", "aggregation": "mean"}) == \
        "\u201ccat\u201d \u00b7 Attention of the token's position over the image \u00b7 layer 3 \u00b7 head 2"
    assert map_caption("cat", "attention", {"layers": "all", "heads": "1", "aggregation": "max"}).endswith(
        "layers all \u00b7 head 1 \u00b7 max over them")
