"""Relevancy's vision-tower variants (`relevancy_vit`, `relevancy_all`) on every family: the tower tokens each adapter
names for a map cell are the ones that cell's LM input is built from (found by gradients, not by the adapter's
reasoning), whether the tower sees an image as one sequence, as tiles, as windows, or several images as one masked
sequence; the block-by-block propagation equals the dense recursion; and the maps are reached through the tower."""

import dataclasses

import numpy as np
import pytest
import torch

from lvlm_interpret import GenerationOptions, generate_with_capture, get_method
from lvlm_interpret.capture import build_inputs
from lvlm_interpret.families import FAMILIES
from lvlm_interpret.methods.relevancy import propagate_block_rows, propagate_rows
from tests.conftest import make_scene
from tests.references import tower_sources

# every registered family, each by its tiny random preset, and OneVision with the real checkpoints' SigLIP tower
FAMILY_NAMES = sorted(FAMILIES) + ["llava_onevision-siglip"]
PROMPT = "What color is the circle?"
# a wide and a tall image: tiled families cut them into different tile arrangements
IMAGES = [(200, 90), (70, 110)]


def check_vision_tokens(loaded, images, cells_per_image=None):
    """The adapter's VisionTokens of each image against the tower tokens the LM inputs of its map cells are built
    from; `cells_per_image` checks an even sample of each image's cells (large grids)."""
    inputs = build_inputs(loaded, images, PROMPT)
    layouts = loaded.family.image_layouts(loaded.model, loaded.processor, inputs, images)
    parts = [loaded.family.vision_tokens(loaded.model, layout) for layout in layouts]
    chosen = [np.arange(layout.n_cells) if cells_per_image is None else
              np.unique(np.linspace(0, layout.n_cells - 1, cells_per_image).round().astype(int)) for layout in layouts]
    positions = [int(layout.positions.reshape(-1)[cell]) for layout, cells in zip(layouts, chosen) for cell in cells]
    size, sources = tower_sources(loaded, inputs, positions)
    offsets = np.cumsum([0] + [part.count for part in parts])
    assert offsets[-1] == size
    expected = []
    for offset, part, cells, layout in zip(offsets, parts, chosen, layouts):
        assert part.groups.shape[0] == layout.n_cells
        assert (part.readout >= 0).all() and (part.readout < part.count).all()
        np.testing.assert_allclose(part.shares.sum(1), 1.0, rtol=1e-5)
        expected += [sorted(set((offset + part.groups[cell][part.shares[cell] > 0]).tolist())) for cell in cells]
    assert sources == expected


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_vision_tokens_are_the_tower_tokens_each_map_cell_is_built_from(models, family):
    check_vision_tokens(models(family), [make_scene(*size) for size in IMAGES])


@pytest.mark.parametrize("family", ["idefics3", "internvl"])
def test_vision_tokens_of_an_image_the_processor_does_not_tile(models, family):
    check_vision_tokens(models(family), [make_scene(30, 30)])


def test_block_rows_equal_the_dense_recursion():
    """Blocks as the towers make them (a layer per image, one of windows, one with a block frozen out) against
    propagate_rows on the dense block-diagonal matrices."""
    generator = torch.Generator().manual_seed(0)
    size = 10
    layouts = [[(0, 6), (6, 4)], [(0, 2), (2, 4), (6, 4)], [(6, 4)]]  # (first, n) per block
    layers = [[(first, torch.rand(3, n, n, generator=generator)) for first, n in blocks] for blocks in layouts]
    dense = []
    for blocks in layers:
        matrix = torch.zeros(3, size, size)
        for first, abar in blocks:
            matrix[:, first:first + abar.shape[-1], first:first + abar.shape[-1]] = abar
        dense.append(matrix)
    rows = torch.rand(3, 2, size, generator=generator)  # [targets, rows per target, size]
    expected = torch.stack([propagate_rows([matrix[k] for matrix in dense], rows[k]) for k in range(3)])
    torch.testing.assert_close(propagate_block_rows(layers, rows), expected)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_vision_maps_are_reached_through_the_tower_and_batch_like_one_token(models, family):
    loaded = models(family)
    trace = generate_with_capture(loaded, [make_scene(*size) for size in IMAGES], PROMPT,
                                  GenerationOptions(max_new_tokens=3, min_new_tokens=3))
    method = get_method("relevancy")
    together = method.explain_many(trace, [0, 2], model=loaded)
    for explanation in together:
        alone = method.explain(trace, explanation.token_index, model=loaded)
        for name in ("vit", "all"):
            for image, layout in enumerate(trace.images):
                grid = explanation.variants[name][image]
                assert grid.shape == (layout.rows, layout.cols) and np.isfinite(grid).all() and (grid >= 0).all()
                np.testing.assert_allclose(grid, alone.variants[name][image], rtol=1e-4, atol=1e-9)
        for image in range(len(trace.images)):
            combined, lm = explanation.variants["all"][image], explanation.maps[image]
            # the tower moves relevance between patches: the combined map is not the LM map
            assert combined.any() and not np.array_equal(combined, lm)
            # the tiny LLaVA's feature layer is the output of its first layer, where the CLS row (the readout)
            # gets no gradient; every other tower is reached, and its map is not flat
            vit = explanation.variants["vit"][image]
            assert family == "llava" or vit.max() > vit.min() > -1e-12


def test_a_tower_the_adapter_misdescribes_leaves_the_lm_map(models, monkeypatch):
    loaded = models("qwen2_vl")
    trace = generate_with_capture(loaded, [make_scene(200, 90)], PROMPT, GenerationOptions(max_new_tokens=2))
    expected = get_method("relevancy").explain(trace, 1, model=loaded)
    describe = loaded.family.vision_tokens
    monkeypatch.setattr(loaded.family, "vision_tokens", lambda model, layout: dataclasses.replace(
        describe(model, layout), count=describe(model, layout).count + 1))
    with pytest.warns(UserWarning, match="attends over 84 tokens, but the adapter places the images on 85"):
        explanation = get_method("relevancy").explain(trace, 1, model=loaded)
    assert explanation.variants == {}
    np.testing.assert_allclose(explanation.maps[0], expected.maps[0], rtol=1e-5)
