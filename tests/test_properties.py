"""Property-based tests: any option value a user can type gets a result or one UserInputError, never a crash."""

from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvlm_interpret import ExplainService, GenerationOptions, UserInputError, get_method
from lvlm_interpret.methods.attention import parse_selection
from lvlm_interpret.methods.tam import rank_gaussian_filter
from lvlm_interpret.server import create_api
from tests.conftest import make_scene
from tests.test_server import _png


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
    greedy_or_sampled = options.temperature == 0 and not options.do_sample or 0.01 <= options.temperature <= 10
    assert 1 <= options.max_new_tokens <= 1024 and greedy_or_sampled and 0 < options.top_p <= 1


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


@pytest.fixture(scope="module")
def http_and_request():
    """The HTTP backend on a tiny model, and one request to explain."""
    client = TestClient(create_api(ExplainService(default_model="random:llava", device="cpu")))
    request_id = client.post("/v1/generate", files={"image": ("s.png", _png(make_scene()), "image/png")},
                             data={"prompt": "Describe the image.", "max_new_tokens": "3"}).json()["request_id"]
    return client, request_id


def _answered_or_refused_in_one_line(response) -> None:
    """Any request gets its result or a 400 / 404 with one line saying what to change: never a 500."""
    assert response.status_code in (200, 400, 404), (response.status_code, response.text[:300])
    if response.status_code != 200:
        message = response.json()["error"]
        assert message and "\n" not in message and "Traceback" not in message


ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 12, 10 ** 12),
                      st.floats(allow_nan=False, allow_infinity=False),  # JSON has neither
                      st.text(max_size=12), st.lists(st.integers(-3, 40), max_size=3))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(max_size=40), max_new_tokens=st.one_of(st.integers(-5, 3), st.integers(1025, 10 ** 12),
                                                              st.text(min_size=1, max_size=6)),
       temperature=st.one_of(st.floats(-1, 20), st.just(float("nan")), st.text(max_size=4)),
       top_p=st.one_of(st.floats(-1, 2), st.just(float("nan"))), seed=st.integers(-10, 10 ** 6))
def test_http_generate_parameters(http_and_request, prompt, max_new_tokens, temperature, top_p, seed):
    client, _ = http_and_request
    response = client.post("/v1/generate", files={"image": ("s.png", _png(make_scene(64, 48)), "image/png")},
                           data={"prompt": prompt, "max_new_tokens": str(max_new_tokens),
                                 "temperature": str(temperature), "top_p": str(top_p), "seed": str(seed)})
    _answered_or_refused_in_one_line(response)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.one_of(st.sampled_from(["attention", "tam", "relevancy", "cleann"]), st.text(max_size=10)),
       token_index=ANY_VALUE, options=st.dictionaries(st.sampled_from(["layers", "heads", "aggregation", "head",
                                                                        "among", "colour", "k"]), ANY_VALUE,
                                                      max_size=2),
       cells=ANY_VALUE, known=st.booleans())
def test_http_explain_and_view_parameters(http_and_request, method, token_index, options, cells, known):
    client, request_id = http_and_request
    request_id = request_id if known else "../" + request_id
    if method == "cleann":  # the slow method: only its option checks here
        options = {**options, "head": 999}
    for response in (
        client.post("/v1/explain", json={"request_id": request_id, "method": method, "token_index": token_index,
                                         "options": options}),
        client.post("/v1/reverse-attention", json={"request_id": request_id, "cells": cells,
                                                   **{k: v for k, v in options.items() if k in ("layers", "heads")}}),
        client.get(f"/v1/attention-overview/{request_id}/{quote(str(token_index), safe='')}"),
        client.get(f"/v1/visual-relevance/{request_id}", params={"threshold": str(token_index)}),
    ):
        _answered_or_refused_in_one_line(response)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.one_of(st.sampled_from(["object", "register", "random", "top"]), st.text(max_size=8)),
       selection=st.dictionaries(st.sampled_from(["box", "buffer", "k", "seed", "method", "mask"]), ANY_VALUE,
                                 max_size=3),
       positions=ANY_VALUE, token_index=ANY_VALUE, replacement=st.one_of(st.sampled_from(["mean", "zero"]), ANY_VALUE),
       windows=st.one_of(st.lists(st.sampled_from(["early", "late", "nowhere"]), max_size=2), ANY_VALUE),
       k=ANY_VALUE, known=st.booleans())
def test_http_analysis_parameters(http_and_request, kind, selection, positions, token_index, replacement, windows, k,
                                  known):
    client, request_id = http_and_request
    request_id = request_id if known else "../" + request_id
    for path, body in (
        ("/v1/analysis-tokens", {"kind": kind, "token_index": token_index, **selection}),
        ("/v1/ablate", {"positions": positions, "token_index": token_index, "replacement": replacement}),
        ("/v1/knockout", {"positions": positions, "token_index": token_index, "windows": windows}),
        ("/v1/logit-lens", {"k": k}),
    ):
        _answered_or_refused_in_one_line(client.post(path, json={"request_id": request_id, **body}))
