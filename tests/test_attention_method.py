"""Raw attention maps equal a hand computation on the captured rows; selections and views behave."""

import numpy as np
import pytest

from lvlm_interpret import UserInputError, get_method
from lvlm_interpret.methods.attention import attention_overview, parse_selection, reverse_attention


def _hand_map(trace, t, layers, heads, reduce):
    layout = trace.images[0]
    rows = trace.attention[t].float().numpy()[layers][:, heads]
    return layout.gather(reduce(reduce(rows, axis=1), axis=0))


@pytest.mark.parametrize("t", [0, 3])
def test_mean_over_all_layers_and_heads(llava_trace, t):
    explanation = get_method("attention").explain(llava_trace, t)
    expected = _hand_map(llava_trace, t, list(range(llava_trace.n_layers)), list(range(llava_trace.n_heads)),
                         np.mean)
    assert explanation.maps[0].shape == (llava_trace.images[0].rows, llava_trace.images[0].cols)
    np.testing.assert_allclose(explanation.maps[0], expected, rtol=1e-5, atol=1e-7)
    assert (explanation.maps[0] >= 0).all()


def test_layer_range_head_and_max(qwen_trace):
    explanation = get_method("attention").explain(qwen_trace, 1, layers="1-2", heads=3, aggregation="max")
    np.testing.assert_allclose(explanation.maps[0], _hand_map(qwen_trace, 1, [1, 2], [3], np.max), rtol=1e-5)


def test_text_scores_cover_positions_up_to_the_source(llava_trace):
    explanation = get_method("attention").explain(llava_trace, 2)
    layout = llava_trace.images[0]
    assert explanation.text_scores.shape == (llava_trace.source_position(2) + 1,)
    assert not explanation.text_scores[layout.token_positions].any()
    # image mass + text mass = the whole (probability) row
    total = explanation.text_scores.sum() + explanation.maps[0].sum()
    assert total == pytest.approx(1.0, abs=5e-3)


@pytest.mark.parametrize("spec,count,expected", [("all", 3, [0, 1, 2]), ("1", 3, [1]), ("0-1", 3, [0, 1]),
                                                  ("2,0", 3, [0, 2]), (1, 3, [1])])
def test_parse_selection(spec, count, expected):
    assert parse_selection(spec, count, "layer") == expected


@pytest.mark.parametrize("kwargs", [{"layers": 99}, {"heads": "x"}, {"aggregation": "median"}, {"layers": "3-1"}])
def test_bad_options_are_user_errors(llava_trace, kwargs):
    with pytest.raises(UserInputError):
        get_method("attention").explain(llava_trace, 0, **kwargs)


def test_out_of_range_token_is_a_user_error(llava_trace):
    with pytest.raises(UserInputError, match="out of range"):
        get_method("attention").explain(llava_trace, llava_trace.n_answer)


def test_reverse_view_scores_each_answer_token_by_the_chosen_cells(llava_trace):
    cells = [(0, 0), (2, 3)]
    scores = reverse_attention(llava_trace, cells)
    assert scores.shape == (llava_trace.n_answer,)
    for t in range(llava_trace.n_answer):
        grid = get_method("attention").explain(llava_trace, t).maps[0]
        assert scores[t] == pytest.approx(grid[0, 0] + grid[2, 3], rel=1e-5)
    with pytest.raises(UserInputError):
        reverse_attention(llava_trace, [(99, 0)])


def test_overview_splits_each_heads_mass(llava_trace):
    overview = attention_overview(llava_trace, 1)
    assert overview["image"].shape == (llava_trace.n_layers, llava_trace.n_heads)
    total = overview["image"] + overview["prompt_text"] + overview["answer"]
    np.testing.assert_allclose(total, 1.0, atol=5e-3)
    # token 0's source is the last prompt position: it cannot attend to answer tokens
    assert not attention_overview(llava_trace, 0)["answer"].any()


def test_unknown_method_names_the_known_ones():
    with pytest.raises(UserInputError, match="attention"):
        get_method("saliency")
