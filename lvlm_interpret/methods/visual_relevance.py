"""Visually relevant tokens (Xing et al. 2025): answer tokens whose likelihood depends on seeing the image.

LLR_t = log p(y_t | image) - log p(y_t | heavily blurred image), both teacher-forced on the generated answer.
A token is visually relevant when LLR > threshold (default 1.0) and it is neither punctuation, a stop word nor
a special token; a one-token answer is kept when p_blur <= 0.5 p.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from .. import notebook
from ..capture import build_inputs, image_inputs, replay_inputs
from ..errors import UserInputError
from ..trace import Trace

STOP_WORDS = frozenset("""
a an the and or but nor so yet of in on at to from by with for about into over under above below between is are
was were be been being am do does did have has had it its this that these those there here i you he she we they me
him her us them my your his our their what which who whom whose where when why how not no as than then too very
can could will would shall should may might must just also only some any each every all both either neither one
""".split())


def blur_kernel_size(width: int) -> int:
    """The reference's kernel: 101 / 201 / 301 / 501 px for widths < 500 / >= 500 / >= 800 / >= 2000."""
    return 501 if width >= 2000 else 301 if width >= 800 else 201 if width >= 500 else 101


def blurred(image: Image.Image) -> Image.Image:
    """Gaussian blur with sigma = kernel - 1, truncated to the kernel's radius (as cv2.GaussianBlur(k, k - 1))."""
    kernel = blur_kernel_size(image.width)
    sigma = kernel - 1
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = gaussian_filter(pixels, sigma=(sigma, sigma, 0), truncate=(kernel // 2) / sigma, mode="reflect")
    return Image.fromarray(np.clip(out.round(), 0, 255).astype(np.uint8), mode="RGB")


def is_content_token(text: str, token_id: int, special_ids: set[int]) -> bool:
    word = text.strip().lower()
    if not word or token_id in special_ids or word in STOP_WORDS:
        return False
    return not all(unicodedata.category(ch)[0] in "PS" for ch in word)


def _image_inputs(loaded, trace: Trace, images: list[Image.Image]) -> dict:
    """The processor's image inputs for `images` in place of the trace's (the prompt's layout must not change)."""
    inputs = build_inputs(loaded, images, trace.prompt)
    if not torch.equal(inputs["input_ids"][0], trace.input_ids[: trace.prompt_length]):
        raise UserInputError("the altered images change the prompt's token layout; use images of the same size")
    return image_inputs(inputs)


@torch.no_grad()
def answer_logprobs_batch(loaded, trace: Trace, image_sets: list[list[Image.Image]],
                          batch_size: int = 16) -> torch.Tensor:
    """[len(image_sets), n_answer]: log p(y_t) for every answer token, teacher-forced, with each set of images in
    place of the trace's. Sets run `batch_size` at a time: every input is concatenated on its first axis (a batch
    axis, or the patch / tile axis of families that flatten images), and logits are kept only where answer tokens
    are predicted."""
    rows = []
    for start in range(0, len(image_sets), batch_size):
        replays = [replay_inputs(trace, loaded.device, _image_inputs(loaded, trace, images))
                   for images in image_sets[start:start + batch_size]]
        inputs = {name: torch.cat([replay[name] for replay in replays]) for name in replays[0]}
        logits = loaded.model(**inputs, logits_to_keep=trace.n_answer + 1).logits[:, :-1].float().cpu()
        rows.append(torch.log_softmax(logits, dim=-1)[:, torch.arange(trace.n_answer), trace.answer_ids])
    return torch.cat(rows)


def answer_logprobs(loaded, trace: Trace, images: list[Image.Image]) -> torch.Tensor:
    """log p(y_t) for every answer token, teacher-forced, with `images` in place of the trace's images."""
    return answer_logprobs_batch(loaded, trace, [images])[0]


@dataclass
class VisualRelevance:
    llr: list[float]
    logprob_image: list[float]
    logprob_blurred: list[float]
    relevant: list[bool]

    def __repr__(self) -> str:
        return notebook.visual_relevance_repr(self)

    def _repr_html_(self) -> str:
        return notebook.visual_relevance_html(self)


def visually_relevant_tokens(loaded, trace: Trace, threshold: float = 1.0) -> VisualRelevance:
    images = [trace.image(k) for k in range(len(trace.images))]
    with_image, with_blur = answer_logprobs_batch(loaded, trace, [images, [blurred(image) for image in images]])
    return VisualRelevance(llr=(with_image - with_blur).tolist(), logprob_image=with_image.tolist(),
                           logprob_blurred=with_blur.tolist(),
                           relevant=relevant_against(trace, with_image, with_blur, threshold))


def relevant_against(trace: Trace, with_image, with_other, threshold: float = 1.0) -> list[bool]:
    """Per answer token: a content token whose log-probability (`with_image`, `with_other`: per token, sequences of
    floats or tensors) drops by more than `threshold` when the image is replaced (a one-token answer: its
    probability at least halves)."""
    with_image, with_other = torch.as_tensor(with_image), torch.as_tensor(with_other)
    special = set(trace.special_token_ids)
    content = [is_content_token(text, token, special) for text, token in zip(trace.answer_texts, trace.answer_ids)]
    if trace.n_answer == 1:
        return [bool(content[0] and with_other.exp()[0] <= 0.5 * with_image.exp()[0])]
    return [bool(keep and value > threshold) for keep, value in zip(content, (with_image - with_other).tolist())]
