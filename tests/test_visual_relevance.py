import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_interpret.methods.visual_relevance import (
    answer_logprobs, answer_logprobs_batch, blur_kernel_size, blurred, is_content_token, visually_relevant_tokens,
)
from tests.conftest import make_scene


@pytest.mark.parametrize("width,kernel", [(96, 101), (499, 101), (500, 201), (799, 201), (800, 301),
                                          (1999, 301), (2000, 501)])
def test_blur_kernel_follows_the_image_width(width, kernel):
    assert blur_kernel_size(width) == kernel


def test_blur_removes_the_objects():
    image = make_scene(160, 96)
    result = np.asarray(blurred(image), dtype=float)
    assert blurred(image).size == image.size
    # no edges are left: the steepest step between neighbouring pixels shrinks by an order of magnitude
    def steepest(pixels):
        return max(np.abs(np.diff(pixels, axis=0)).max(), np.abs(np.diff(pixels, axis=1)).max())
    assert steepest(result) < 0.1 * steepest(np.asarray(image, dtype=float))


def test_content_filter_uses_text_not_ids():
    special = {7}
    assert is_content_token(" red", 100, special) and is_content_token("Circle", 101, special)
    assert not any(is_content_token(text, 100, special) for text in ("the", " The", ",", ".", "  ", "and"))
    assert not is_content_token("red", 7, special)


def test_llr_is_image_minus_blurred_log_likelihood(llava, llava_trace):
    result = visually_relevant_tokens(llava, llava_trace)
    assert len(result.llr) == llava_trace.n_answer
    np.testing.assert_allclose(result.logprob_image, llava_trace.answer_logprobs.numpy(), atol=1e-3)
    np.testing.assert_allclose(result.llr, np.subtract(result.logprob_image, result.logprob_blurred), atol=1e-6)
    blurred_again = answer_logprobs(llava, llava_trace, [blurred(llava_trace.image(0))])
    np.testing.assert_allclose(result.logprob_blurred, blurred_again.numpy(), atol=1e-6)
    everything = visually_relevant_tokens(llava, llava_trace, threshold=-np.inf)
    special = set(llava_trace.special_token_ids)
    assert everything.relevant == [is_content_token(text, token, special) for text, token in
                                   zip(llava_trace.answer_texts, llava_trace.answer_ids)]
    assert not any(visually_relevant_tokens(llava, llava_trace, threshold=np.inf).relevant)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_batched_replays_equal_one_at_a_time(family, llava, qwen2_vl, llava_trace, qwen_trace):
    """Image sets run together (LLaVA stacks a batch axis, Qwen2-VL concatenates patches) give each set's own
    log-probs, with logits kept only where answer tokens are predicted."""
    loaded, trace = (llava, llava_trace) if family == "llava" else (qwen2_vl, qwen_trace)
    image = trace.image(0)
    sets = [[image], [blurred(image)], [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]]
    together = answer_logprobs_batch(loaded, trace, sets, batch_size=2)
    assert together.shape == (3, trace.n_answer)
    for row, images in zip(together, sets):
        torch.testing.assert_close(row, answer_logprobs(loaded, trace, images), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together[0], trace.answer_logprobs, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(together[0], together[2], atol=1e-4)  # each set is its own image
