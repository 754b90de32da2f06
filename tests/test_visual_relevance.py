import numpy as np
import pytest

from lvlm_interpret.methods.visual_relevance import (
    answer_logprobs, blur_kernel_size, blurred, is_content_token, visually_relevant_tokens,
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
