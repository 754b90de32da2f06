"""Relevancy: propagation rules on hand inputs, the maps against an independent full-matrix computation on
HF's eager attention, and batched == one token at a time."""

import numpy as np
import pytest
import torch

from lvlm_interpret import get_method
from lvlm_interpret.methods.relevancy import head_mean_relevance, propagate_row, propagate_rows
from tests.references import reference_lm_map


def test_head_mean_relevance_hand_values():
    gradient = torch.tensor([[[1.0, -2.0]], [[3.0, 1.0]]])  # [heads=2, q=1, k=2]
    attention = torch.tensor([[[0.5, 0.5]], [[0.25, 0.75]]])
    # relu(G * A): head 0 -> (0.5, 0), head 1 -> (0.75, 0.75); mean -> (0.625, 0.375)
    np.testing.assert_allclose(head_mean_relevance(gradient, attention).numpy(), [[0.625, 0.375]])


def test_row_propagation_equals_the_full_recursion():
    generator = torch.Generator().manual_seed(0)
    abars = [torch.rand(6, 6, generator=generator).tril() for _ in range(4)]
    # hand recursion, forward order: R <- R + Abar @ R
    relevance = torch.eye(6)
    for abar in abars:
        relevance = relevance + abar @ relevance
    for position in range(6):
        torch.testing.assert_close(propagate_row(abars, position), relevance[position])
    starts = torch.rand(3, 6, generator=generator)
    torch.testing.assert_close(propagate_rows(abars, starts), starts @ relevance)
    # one set of abars per row (a chunk of targets)
    per_row = [torch.stack([a, a.T.tril(), 2 * a]) for a in abars]
    for k in range(3):
        torch.testing.assert_close(propagate_rows(per_row, starts)[k], propagate_rows([a[k] for a in per_row], starts[k]))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_lm_map_equals_full_matrix_reference(family, llava, qwen2_vl, llava_trace, qwen_trace):
    loaded, trace = (llava, llava_trace) if family == "llava" else (qwen2_vl, qwen_trace)
    for t in (0, trace.n_answer - 1):
        explanation = get_method("relevancy").explain(trace, t, model=loaded)
        expected, logit = reference_lm_map(loaded, trace, t)
        np.testing.assert_allclose(explanation.maps[0], expected, rtol=1e-3, atol=1e-6)
        assert explanation.details["target_logit"] == pytest.approx(logit, abs=1e-4)
        assert explanation.maps[0].any()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batched_equals_one_token_at_a_time(family, llava, qwen2_vl, llava_trace, qwen_trace):
    loaded, trace = (llava, llava_trace) if family == "llava" else (qwen2_vl, qwen_trace)
    method = get_method("relevancy")
    tokens = list(range(trace.n_answer))
    batched = method.explain_many(trace, tokens, model=loaded, chunk_size=4)
    sized_to_memory = method.explain_many(trace, tokens, model=loaded)  # one chunk: all tokens fit in 1 GB
    tiny_budget = method.explain_many(trace, tokens[:3], model=loaded, memory_mb=1e-6)  # chunks of one
    for together in sized_to_memory + tiny_budget:
        for name, maps in together.all_maps().items():
            np.testing.assert_allclose(maps[0], batched[together.token_index].all_maps()[name][0], rtol=1e-4,
                                       atol=1e-7)
    for t, together in zip(tokens, batched):
        alone = method.explain(trace, t, model=loaded)
        for name, maps in alone.all_maps().items():
            np.testing.assert_allclose(together.all_maps()[name][0], maps[0], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(together.text_scores, alone.text_scores, rtol=1e-4, atol=1e-7)


def test_variants_have_the_grid_shape_and_are_non_negative(qwen2_vl, qwen_trace):
    explanation = get_method("relevancy").explain(qwen_trace, 1, model=qwen2_vl)
    layout = qwen_trace.images[0]
    assert set(explanation.all_maps()) == {"relevancy", "relevancy_vit", "relevancy_all"}
    for maps in explanation.all_maps().values():
        assert maps[0].shape == (layout.rows, layout.cols) and (maps[0] >= 0).all()
    # Qwen's vision tower has no CLS: its relevancy is read from the mean row, which reaches every patch
    assert explanation.variants["vit"][0].all()
    assert explanation.text_scores.shape == (qwen_trace.source_position(1) + 1,)
