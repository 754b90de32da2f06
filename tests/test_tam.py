"""TAM: the formulas on hand-computed inputs, and the maps against a teacher-forced replay of the model."""

import numpy as np
import pytest
import torch

from lvlm_interpret import get_method
from lvlm_interpret.methods.base import image_cell_positions
from lvlm_interpret.methods.tam import (
    context_positions, interference_scale, rank_gaussian_filter, remove_interference,
)
from tests.references import eager_replay


def _reference_filter(grid):
    """The definition, one pixel at a time."""
    padded = np.pad(grid, 1, mode="reflect")
    out = np.zeros_like(grid, dtype=float)
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            window = np.sort(padded[r:r + 3, c:c + 3].ravel())
            mean = window.mean()
            if mean <= 0:
                continue
            sigma = window.std() / mean
            if sigma == 0:
                out[r, c] = mean
                continue
            weights = np.exp(-np.arange(-4, 5) ** 2 / (2 * sigma ** 2))
            out[r, c] = (weights / weights.sum() * window).sum()
    return out


def test_rank_gaussian_filter_matches_the_per_pixel_definition():
    grid = np.random.default_rng(0).random((5, 7)) * 3
    grid[0, :] = 0.0
    np.testing.assert_allclose(rank_gaussian_filter(grid), _reference_filter(grid), rtol=1e-5)


def test_rank_gaussian_filter_hand_values():
    # centre window of 0..8 (a 3x3 grid): symmetric sorted values around the mean 4 -> exactly 4
    assert rank_gaussian_filter(np.arange(9.0).reshape(3, 3))[1, 1] == pytest.approx(4.0)
    # constant windows keep their value instead of NaN; non-positive windows give 0
    np.testing.assert_array_equal(rank_gaussian_filter(np.full((4, 4), 2.5)), 2.5)
    np.testing.assert_array_equal(rank_gaussian_filter(np.zeros((3, 3))), 0.0)
    assert np.isfinite(rank_gaussian_filter(np.ones((1, 5)))).all()


def test_interference_removal_by_least_squares():
    target, interference = np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 1.0])
    assert interference_scale(target, interference) == pytest.approx(2.0)
    cleaned = remove_interference(target, np.array([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]), np.array([1.0, 0.0]))
    # w = (1, 0): I = (2, 2, 2), a = 12 / 12 = 1 -> relu(target - I)
    np.testing.assert_allclose(cleaned, [0.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_array_equal(remove_interference(target, np.zeros((0, 3)), np.zeros(0)), target)


@pytest.mark.parametrize("t", [0, 2])
def test_raw_map_is_the_models_logit_of_the_token_at_image_positions(llava, llava_trace, scene, t):
    output = eager_replay(llava, llava_trace)
    explanation = get_method("tam").explain(llava_trace, t, model=llava)
    layout = llava_trace.images[0]
    # the class is the explained answer token itself (also for the first generated token)
    expected = layout.gather(torch.relu(output.logits[0, :, llava_trace.answer_ids[t]]).numpy())
    np.testing.assert_allclose(explanation.variants["raw"][0], expected, atol=2e-2)
    text = torch.relu(output.logits[0, : llava_trace.source_position(t) + 1, llava_trace.answer_ids[t]]).numpy()
    text[layout.token_positions] = 0
    np.testing.assert_allclose(explanation.text_scores, text, atol=2e-2)
    np.testing.assert_allclose(explanation.maps[0], rank_gaussian_filter(explanation.variants["cleaned"][0]),
                               rtol=1e-5)
    assert all((m >= 0).all() for m in explanation.all_maps()["tam"])


def test_context_is_earlier_text_only(llava_trace):
    trace = llava_trace
    images = set(image_cell_positions(trace).tolist())
    for t in range(trace.n_answer):
        context = context_positions(trace, t)
        assert all(j < trace.prompt_length + t and j not in images for j in context)
        assert all(trace.token_texts[j].strip() != trace.answer_texts[t].strip() for j in context)
        assert not any(int(trace.input_ids[j]) in trace.special_token_ids for j in context)
    assert max(context_positions(trace, 0)) < trace.prompt_length
