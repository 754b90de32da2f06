"""TAM: the formulas on hand-computed inputs, and the maps against a teacher-forced replay of the model."""

import gc
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lvlm_interpret import get_method
from lvlm_interpret.families.base import ImageLayout
from lvlm_interpret.methods.base import image_cell_positions
from lvlm_interpret.methods.tam import (
    context_positions, interference_scale, rank_gaussian_filter, remove_interference, user_text_positions,
    weight_positions,
)
from lvlm_interpret.trace import Trace
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


def test_context_is_the_users_text_and_earlier_answer_tokens(llava_trace, qwen_trace):
    for trace in (llava_trace, qwen_trace):
        user_text = user_text_positions(trace)
        # the user's words, not the chat template's role words ("user", ":", "assistant") or special tokens
        assert "".join(trace.token_texts[j] for j in user_text).replace(" ", "").casefold() == \
            trace.prompt.replace(" ", "").casefold()
        assert user_text[0] > max(image_cell_positions(trace)) and user_text[-1] < trace.prompt_length - 1
        images = set(image_cell_positions(trace).tolist())
        for t in range(trace.n_answer):
            context = context_positions(trace, t)
            assert all(j in user_text or trace.prompt_length <= j < trace.prompt_length + t for j in context)
            assert not images & set(context)
            assert all(trace.token_texts[j].strip() != trace.answer_texts[t].strip() for j in context)
        assert set(context_positions(trace, 0)) <= set(user_text)


# A hand-made trace whose LM head is the identity: the logit of class c at position i is hidden[i, c].
VOCAB = ["<s>", "user", ":", "<image>", "red", "?", "assistant", "a", "dot", "caf", "\ufffd"]
IMAGE_START, PROMPT = 2, ["user", ":", "<image>", "<image>", "<image>", "<image>", "red", "?", "assistant", ":"]


def _hand_trace(logits: list, prompt_text: str = "Red?", prompt=PROMPT, answer=("a", "red", "dot")) -> Trace:
    tokens = [*prompt, *answer]
    hidden = torch.zeros(len(tokens) - 1, len(VOCAB), dtype=torch.float16)
    for positions, word, values in logits:
        hidden[list(positions), VOCAB.index(word)] = torch.tensor(values, dtype=torch.float16)
    return Trace(
        model_name="hand", prompt=prompt_text, answer=" ".join(answer),
        input_ids=torch.tensor([VOCAB.index(token) for token in tokens]), prompt_length=len(prompt),
        token_texts=tokens, images=[ImageLayout.contiguous(IMAGE_START, 2, 2, (0, 0, 2, 2), (2, 2))],
        attention=torch.zeros(len(answer), 1, 1, len(tokens) - 1, dtype=torch.float16), hidden=hidden,
        answer_logprobs=torch.zeros(len(answer)), special_token_ids=[0],
    )


def _identity_model():
    head = torch.nn.Linear(len(VOCAB), len(VOCAB), bias=False)
    torch.nn.init.eye_(head.weight)
    return SimpleNamespace(family=SimpleNamespace(lm_head=lambda model: model), model=head)


CELLS = range(IMAGE_START, IMAGE_START + 4)
HAND_LOGITS = [  # (positions, class, logits)
    (CELLS, "dot", [4, 2, 0, 2]),  # the explained token's raw map
    (CELLS, "red", [2, 0, 0, 0]),
    (CELLS, "?", [0, 1, 0, 1]),
    (CELLS, "a", [1, 1, 1, 1]),
    (CELLS, ":", [0, 0, 2, 0]),
    # the class "dot" at text positions, the context tokens' weights; the template's "user", ":", "assistant" carry
    # weight (and ":" a map), and "dot"'s predicting position 11 a large one: neither may enter "dot"'s context
    ([0, 1, 6, 7, 8, 9, 10, 11], "dot", [1, 1, 1, 0, 1, 1, 2, 6]),
]


def _fractions(values):
    return np.array([float(Fraction(value)) for value in values])


def test_cleaned_map_against_a_hand_computed_context():
    trace, model = _hand_trace(HAND_LOGITS), _identity_model()
    # "dot" (answer token 2): the user's "red", "?" and the answer's "a", "red"; the answer tokens' weights are read
    # where they were predicted (positions 9 and 10), the prompt tokens' at their own
    assert user_text_positions(trace) == [6, 7]
    assert context_positions(trace, 2) == [6, 7, 10, 11]
    assert weight_positions(trace, [6, 7, 10, 11]) == [6, 7, 9, 10]
    # weights s = (1, 0, 1, 2): I ~ 1 red + 0 ? + 1 a + 2 red = (7, 1, 1, 1); a = <M, I> / <I, I> = 32 / 52;
    # relu(M - a I) = relu(4 - 56/13, 2 - 8/13, 0 - 8/13, 2 - 8/13)
    explanation = get_method("tam").explain(trace, 2, model=model)
    np.testing.assert_allclose(explanation.variants["raw"][0].ravel(), [4, 2, 0, 2])
    np.testing.assert_allclose(explanation.variants["cleaned"][0].ravel(), _fractions(["0", "18/13", "0", "18/13"]),
                               rtol=1e-6)
    np.testing.assert_allclose(explanation.maps[0], rank_gaussian_filter(explanation.variants["cleaned"][0]))
    # the same as numpy's least squares on the same context
    maps = np.array([[2, 0, 0, 0], [0, 1, 0, 1], [1, 1, 1, 1], [2, 0, 0, 0]], dtype=float)
    interference = np.array([1, 0, 1, 2]) @ maps
    scale = np.linalg.lstsq(interference[:, None], np.array([4, 2, 0, 2.0]), rcond=None)[0][0]
    np.testing.assert_allclose(explanation.variants["cleaned"][0].ravel(),
                               np.maximum([4, 2, 0, 2] - scale * interference, 0), rtol=1e-6)
    # "red" (token 1) is not its own context; the first token's context is the user's text alone
    assert context_positions(trace, 1) == [7, 10]
    assert context_positions(trace, 0) == [6, 7]


@pytest.mark.parametrize("prompt_text, words, expected", [
    ("Assistant", ["assistant"], [6]),  # the user's word, not the template's after it
    ("Café?", ["caf", "\ufffd", "\ufffd", "?"], [6, 7, 8, 9]),  # "é" in two tokens, each decoding to U+FFFD
    ("Blue!", ["red", "?"], [0, 1, 6, 7, 8, 9]),  # not found: every text token of the prompt
])
def test_user_text_positions(prompt_text, words, expected):
    prompt = ["user", ":", "<image>", "<image>", "<image>", "<image>", *words, "assistant", ":"]
    assert user_text_positions(_hand_trace([], prompt_text=prompt_text, prompt=prompt)) == expected


def test_each_trace_gets_its_own_activations_one_token_at_a_time():
    model = _identity_model()
    first = _hand_trace(HAND_LOGITS)
    batched = get_method("tam").explain_many(first, [0, 1, 2], model=model)
    one_at_a_time = [get_method("tam").explain(first, t, model=model) for t in (2, 0, 1)]
    for expected, explanation in zip([batched[2], batched[0], batched[1]], one_at_a_time):
        for name, maps in expected.all_maps().items():
            np.testing.assert_array_equal(explanation.all_maps()[name][0], maps[0])
    del first, batched, one_at_a_time
    gc.collect()
    # a new trace (possibly at the freed one's address) with other states
    second = _hand_trace([(CELLS, "dot", [0, 3, 0, 0])])
    np.testing.assert_array_equal(get_method("tam").explain(second, 2, model=model).variants["raw"][0].ravel(),
                                  [0, 3, 0, 0])
