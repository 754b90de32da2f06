"""Token Activation Map (Li et al., ICCV 2025).

Raw map: the model's own logit for the explained token's class read at every image position,
relu(h_i . w_c) with h the last-layer state after the final norm. Estimated causal inference removes the
"contextual interference" of earlier text tokens (closed-form least squares), and a rank Gaussian filter
denoises the grid. One generation with captured hidden states is enough: no backward pass.

The interference context is the authors' (xmed-lab/TAM): the user's own prompt text and the earlier answer tokens,
an answer token weighted by the class's score at the position that predicted it, a prompt token at its own position.
"""

from __future__ import annotations

import threading
import weakref

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


def _not_space(character: str) -> bool:
    return not character.isspace()


def _ascii_not_space(character: str) -> bool:
    return character.isascii() and not character.isspace()


def user_text_positions(trace: Trace) -> list[int]:
    """The prompt positions that hold the user's own text (the trace's prompt), not the chat template's role words
    or special tokens: the first run of text tokens after the last image token whose text is the prompt's, case and
    whitespace aside (then without non-ASCII characters: a token may hold a part of one, which decodes to U+FFFD).
    Every text token of the prompt where the prompt's text is not found."""
    images, special = image_token_positions(trace), set(trace.special_token_ids)
    text = [j for j in range(trace.prompt_length) if j not in images and int(trace.input_ids[j]) not in special]
    last_image = max(images, default=-1)
    after_images = [j for j in text if j > last_image]
    for keep in (_not_space, _ascii_not_space):
        characters, owners = [], []
        for j in after_images:
            kept = [character for character in trace.token_texts[j].casefold() if keep(character)]
            characters += kept
            owners += [j] * len(kept)
        target = "".join(character for character in trace.prompt.casefold() if keep(character))
        start = "".join(characters).find(target)
        if target and start >= 0:
            first, last = owners[start], owners[start + len(target) - 1]
            return [j for j in after_images if first <= j <= last]
    return text


def interfering_positions(trace: Trace) -> list[int]:
    """Every position that may interfere with some answer token: the user's prompt text and the answer's tokens
    that are no special tokens."""
    special = set(trace.special_token_ids)
    answer = [j for j in range(trace.prompt_length, len(trace.token_texts)) if int(trace.input_ids[j]) not in special]
    return user_text_positions(trace) + answer


def context_positions(trace: Trace, token_index: int, candidates: list[int] | None = None) -> list[int]:
    """The earlier text tokens that interfere with answer token `token_index`: the `interfering_positions` before
    it, except tokens with its own text (surrounding whitespace aside)."""
    candidates = interfering_positions(trace) if candidates is None else candidates
    target_text = trace.answer_texts[token_index].strip()
    end = trace.prompt_length + token_index
    return [j for j in candidates if j < end and trace.token_texts[j].strip() != target_text]


def weight_positions(trace: Trace, positions: list[int]) -> list[int]:
    """Where each context token's weight (the explained class's score) is read: an answer token's at the position
    that predicted it, a prompt token's at its own (as the authors' code reads them)."""
    return [j - 1 if j >= trace.prompt_length else j for j in positions]


class _TraceActivations:
    """What TAM reads of a trace, computed on its first use: the positions that may interfere
    (`interfering_positions`) and relu(h_i . w_c) at every position for every class its maps can need (the
    answer's tokens and the user's text), a [positions, classes] float32 array from one product of the trace's
    states, converted to float32 once, with those LM-head rows. Every later token of the answer (a batch, the page's
    clicks and linked views) then costs no torch operation, which is what grows when other processes share the
    cores. It keeps the most recently explained trace's only (positions x classes x 4 bytes, less than the states
    in float32) and lets it go with the trace."""

    def __init__(self):
        self._lock = threading.Lock()
        # (weak reference to the trace, weak reference to the LM head, interfering positions, {class: column},
        # activations)
        self._entry = None

    def _forget(self, trace_reference) -> None:
        entry = self._entry
        if entry is not None and entry[0] is trace_reference:
            self._entry = None

    def get(self, trace: Trace, lm_head: torch.nn.Module) -> tuple[list[int], dict[int, int], np.ndarray]:
        with self._lock:
            entry = self._entry
            if entry is None or entry[0]() is not trace or entry[1]() is not lm_head:
                candidates = interfering_positions(trace)
                classes = list(dict.fromkeys(trace.answer_ids + [int(trace.input_ids[j]) for j in candidates]))
                with torch.no_grad():
                    logits = trace.hidden.to(lm_head.weight.device, torch.float32) @ lm_head.weight[classes].float().T
                    if getattr(lm_head, "bias", None) is not None:
                        logits += lm_head.bias[classes].float()
                activations = torch.relu(logits).cpu().numpy()
                activations.setflags(write=False)  # shared by every later call on the trace
                entry = (weakref.ref(trace, self._forget), weakref.ref(lm_head), candidates,
                         {c: i for i, c in enumerate(classes)}, activations)
                self._entry = entry
            return entry[2:]


_TRACE_ACTIVATIONS = _TraceActivations()


@register_method
class TokenActivationMap(ExplanationMethod):
    name = "tam"
    description = "Token Activation Map: class activation of the token's LM-head row on image states, with " \
                  "earlier-token interference removed and a rank Gaussian filter."

    def explain(self, trace, token_index, model=None, remove_context: bool = True, denoise: bool = True):
        return self.explain_many(trace, [token_index], model, remove_context, denoise)[0]

    def explain_many(self, trace, token_indices, model=None, remove_context: bool = True, denoise: bool = True):
        """Every token's maps, read from the trace's activations (`_TraceActivations`)."""
        if model is None:
            raise UserInputError("tam needs the model that generated the trace (its LM head)")
        for token_index in token_indices:
            trace.check_token_index(token_index)
        candidates, column, activations = _TRACE_ACTIVATIONS.get(trace, model.family.lm_head(model.model))
        answer_ids = trace.answer_ids
        images = image_cell_positions(trace)

        def per_image(values):
            by_position = np.zeros(len(activations), dtype=np.float32)
            by_position[images] = values
            return split_by_image(trace, by_position)

        explanations = []
        for t in token_indices:
            target = column[answer_ids[t]]
            context_here = context_positions(trace, t, candidates) if remove_context else []
            raw = activations[images, target]
            if context_here:
                earlier_classes = [column[int(trace.input_ids[j])] for j in context_here]
                earlier_maps = activations[np.ix_(images, earlier_classes)].T
                scores = activations[weight_positions(trace, context_here), target]
                cleaned = remove_interference(raw, earlier_maps, scores)
            else:
                cleaned = raw
            cleaned_maps = per_image(cleaned)
            final = [rank_gaussian_filter(grid) for grid in cleaned_maps] if denoise else cleaned_maps
            explanations.append(Explanation(
                method=self.name,
                token_index=t,
                maps=final,
                text_scores=text_only(trace, activations[: trace.source_position(t) + 1, target]),
                variants={"raw": per_image(raw), "cleaned": cleaned_maps},
                details={"context_positions": context_here, "remove_context": remove_context, "denoise": denoise},
            ))
        return explanations
