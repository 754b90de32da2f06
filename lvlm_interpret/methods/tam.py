"""Token Activation Map (Li et al., ICCV 2025).

Raw map: the model's own logit for the explained token's class read at every image position,
relu(h_i . w_c) with h the last-layer state after the final norm. Estimated causal inference removes the
"contextual interference" of earlier text tokens (closed-form least squares), and a rank Gaussian filter
denoises the grid. One generation with captured hidden states is enough: no backward pass.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import UserInputError
from ..trace import Trace
from .base import (
    Explanation, ExplanationMethod, image_cell_positions, image_token_positions, register_method, split_by_image,
    text_only,
)

RANK_OFFSETS = np.arange(-4, 5, dtype=np.float64)  # ranks of the 9 sorted values of a 3x3 window


def rank_gaussian_filter(grid: np.ndarray) -> np.ndarray:
    """A soft median over 3x3 windows (reflect padding): the window's sorted values weighted by a Gaussian over
    their rank, with sigma = the window's coefficient of variation. 0 where the window mean is <= 0; a constant
    window keeps its value (sigma = 0 is defined as the plain mean)."""
    grid = np.asarray(grid, dtype=np.float64)
    mode = "reflect" if min(grid.shape) > 1 else "edge"
    windows = sliding_window_view(np.pad(grid, 1, mode=mode), (3, 3)).reshape(*grid.shape, 9)
    ordered = np.sort(windows, axis=-1)
    mean, std = windows.mean(-1), windows.std(-1)
    sigma = np.divide(std, mean, out=np.zeros_like(mean), where=mean > 0)
    safe_sigma = np.where(sigma > 0, sigma, 1.0)[..., None]
    weights = np.exp(-(RANK_OFFSETS ** 2) / (2 * safe_sigma ** 2))
    weights /= weights.sum(-1, keepdims=True)
    filtered = (weights * ordered).sum(-1)
    result = np.where(sigma > 0, filtered, mean)
    return np.where(mean > 0, result, 0.0).astype(np.float32)


def interference_scale(target: np.ndarray, interference: np.ndarray) -> float:
    """The least-squares a minimising ||target - a * interference||^2 (0 when there is no interference)."""
    denominator = float(np.dot(interference, interference))
    return float(np.dot(target, interference)) / denominator if denominator > 0 else 0.0


def remove_interference(target_map: np.ndarray, earlier_maps: np.ndarray, earlier_scores: np.ndarray) -> np.ndarray:
    """Estimated causal inference: relu(M_t - a I), I = sum_j w_j M_j with w_j = s_j / (sum s + 1e-8)."""
    if earlier_maps.shape[0] == 0:
        return target_map.copy()
    weights = earlier_scores / (earlier_scores.sum() + 1e-8)
    interference = weights @ earlier_maps
    return np.maximum(target_map - interference_scale(target_map, interference) * interference, 0.0)


def context_positions(trace: Trace, token_index: int) -> list[int]:
    """Earlier text tokens that may interfere: prompt text and earlier answer tokens, not image or special tokens,
    and not the same text as the explained token."""
    in_image = image_token_positions(trace)
    special = set(trace.special_token_ids)
    target_text = trace.answer_texts[token_index].strip()
    return [
        j for j in range(trace.prompt_length + token_index)
        if j not in in_image and int(trace.input_ids[j]) not in special and trace.token_texts[j].strip() != target_text
        and trace.token_texts[j].strip()
    ]


@register_method
class TokenActivationMap(ExplanationMethod):
    name = "tam"
    description = "Token Activation Map: class activation of the token's LM-head row on image states, with " \
                  "earlier-token interference removed and a rank Gaussian filter."

    def explain(self, trace, token_index, model=None, remove_context: bool = True, denoise: bool = True):
        if model is None:
            raise UserInputError("tam needs the model that generated the trace (its LM head)")
        trace.check_token_index(token_index)
        lm_head = model.family.lm_head(model.model)
        target_class = trace.answer_ids[token_index]
        context = context_positions(trace, token_index) if remove_context else []
        classes = [target_class] + [int(trace.input_ids[j]) for j in context]
        source = trace.source_position(token_index)
        with torch.no_grad():
            hidden = trace.hidden[: source + 1].to(lm_head.weight.device, lm_head.weight.dtype)
            weight = lm_head.weight[classes]
            logits = (hidden @ weight.T).float()  # [positions, classes]
            if getattr(lm_head, "bias", None) is not None:
                logits += lm_head.bias[classes].float()
        activations = torch.relu(logits).cpu().numpy()
        images = image_cell_positions(trace)
        raw = activations[images, 0]
        cleaned = remove_interference(raw, activations[images, 1:].T, activations[context, 0]) if context else raw
        text_scores = text_only(trace, activations[:, 0])

        def per_image(values):
            by_position = np.zeros(len(activations), dtype=np.float32)
            by_position[images] = values
            return split_by_image(trace, by_position)

        cleaned_maps = per_image(cleaned)
        final = [rank_gaussian_filter(grid) for grid in cleaned_maps] if denoise else cleaned_maps
        return Explanation(
            method=self.name,
            token_index=token_index,
            maps=final,
            text_scores=text_scores,
            variants={"raw": per_image(raw), "cleaned": cleaned_maps},
            details={"context_positions": context, "remove_context": remove_context, "denoise": denoise},
        )
