"""Property-based tests: any option value a user can type gets a result or one UserInputError, never a crash."""

from hypothesis import given, settings
from hypothesis import strategies as st

import numpy as np

from lvlm_interpret import GenerationOptions, UserInputError, get_method
from lvlm_interpret.methods.attention import parse_selection
from lvlm_interpret.methods.tam import rank_gaussian_filter


@given(spec=st.one_of(st.text(max_size=12), st.integers(-5, 40), st.lists(st.integers(-3, 12), max_size=4)),
       count=st.integers(1, 12))
def test_selection_specs(spec, count):
    try:
        chosen = parse_selection(spec, count, "layer")
    except UserInputError:
        return
    assert chosen == sorted(set(chosen)) and all(0 <= i < count for i in chosen) and chosen


@given(max_new_tokens=st.integers(-5, 2000), temperature=st.one_of(st.floats(-1, 20), st.just(float("nan"))),
       top_p=st.one_of(st.floats(-1, 2), st.just(float("nan"))), min_new_tokens=st.integers(-2, 50))
def test_generation_options(max_new_tokens, temperature, top_p, min_new_tokens):
    options = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                min_new_tokens=min_new_tokens)
    try:
        options.validate()
    except UserInputError:
        return
    assert 1 <= options.max_new_tokens <= 1024 and 0 < options.temperature <= 10 and 0 < options.top_p <= 1


@settings(max_examples=30, deadline=None)
@given(token=st.integers(-3, 12), layers=st.sampled_from(["all", "0", "1-2", "9", "x", "2-0"]),
       heads=st.sampled_from(["all", "0", "3", "7", ""]), aggregation=st.sampled_from(["mean", "max", "sum"]))
def test_attention_options_on_a_real_trace(llava_trace, token, layers, heads, aggregation):
    try:
        explanation = get_method("attention").explain(llava_trace, token, layers=layers, heads=heads,
                                                      aggregation=aggregation)
    except UserInputError:
        return
    assert (explanation.maps[0] >= 0).all()


@given(st.lists(st.floats(0, 1e6), min_size=4, max_size=4).map(lambda v: np.array(v).reshape(2, 2)))
def test_rank_filter_is_finite_and_non_negative(grid):
    result = rank_gaussian_filter(grid)
    assert np.isfinite(result).all() and (result >= 0).all()
