"""Relevancy maps (Chefer, Gur, Wolf 2021, rules 5-6), as LVLM-Interpret uses them, done efficiently.

For target y_t with raw logit s at its source position p: for every LM layer, G = ds/dA,
Abar = mean over heads of relu(G * A), and R <- R + Abar @ R from R = I. Only row p of the final R is
needed, so it is propagated as a row vector from the last layer down (O(S^2) per layer instead of O(S^3)).
Gradients come from one teacher-forced forward over the final sequence with grad enabled and one batched
backward for a chunk of targets (`is_grads_batched`), never from the decoding graph.
Variants: "vit" (the same rules through the vision tower, read from its summary row) and "all" (the LM
relevancy of the image tokens pushed through the vision tower's relevancy matrix).
"""

from __future__ import annotations

import numpy as np
import torch

from ..capture import AttentionGraph, replay_inputs
from ..errors import UserInputError
from .base import Explanation, ExplanationMethod, register_method, split_by_image, text_only


def head_mean_relevance(gradient: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Abar = mean over heads of relu(G * A): [heads, q, k] -> [q, k]."""
    return torch.relu(gradient.float() * attention.float()).mean(0)


def propagate_row(abars: list[torch.Tensor], position: int) -> torch.Tensor:
    """Row `position` of R = (I + Abar_L) ... (I + Abar_1), layers given in forward order."""
    row = torch.zeros(abars[0].shape[-1], dtype=torch.float32, device=abars[0].device)
    row[position] = 1.0
    for abar in reversed(abars):
        row = row + row @ abar
    return row


def propagate_matrix(abars: list[torch.Tensor]) -> torch.Tensor:
    """The full R, layers in forward order (used for the vision tower, whose R is needed whole)."""
    size = abars[0].shape[-1] if abars else 0
    relevance = torch.eye(size, dtype=torch.float32, device=abars[0].device if abars else None)
    for abar in abars:
        relevance = relevance + abar @ relevance
    return relevance


def _gradients(targets: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """d target_k / d input for every target k at once: each result is [n_targets, *input.shape] or None."""
    if targets.shape[0] == 1:
        grads = torch.autograd.grad(targets[0], inputs, allow_unused=True)
        return [None if g is None else g[None] for g in grads]
    eye = torch.eye(targets.shape[0], dtype=targets.dtype, device=targets.device)
    return list(torch.autograd.grad(targets, inputs, grad_outputs=eye, is_grads_batched=True, allow_unused=True))


@register_method
class Relevancy(ExplanationMethod):
    name = "relevancy"
    description = "Gradient-weighted attention relevancy (Chefer et al.) through the LM; variants through the " \
                  "vision tower (vit) and both combined (all)."

    def explain(self, trace, token_index, model=None, chunk_size=8):
        return self.explain_many(trace, [token_index], model=model, chunk_size=chunk_size)[0]

    def explain_many(self, trace, token_indices, model=None, chunk_size=8):
        if model is None:
            raise UserInputError("relevancy needs the model that generated the trace")
        if chunk_size < 1:
            raise UserInputError(f"chunk size must be at least 1, got {chunk_size}")
        for t in token_indices:
            trace.check_token_index(t)
        results = []
        for start in range(0, len(token_indices), chunk_size):
            results.extend(self._chunk(trace, list(token_indices[start:start + chunk_size]), model))
        return results

    def _chunk(self, trace, token_indices, loaded):
        family, model = loaded.family, loaded.model
        lm_modules = family.language_attentions(model)
        vision_modules = family.vision_attentions(model) if family.vision_relevancy else []
        with torch.enable_grad(), AttentionGraph(lm_modules + vision_modules) as graph:
            logits = model(**replay_inputs(trace, loaded.device)).logits[0]
            sources = [trace.source_position(t) for t in token_indices]
            targets = logits[sources, [trace.answer_ids[t] for t in token_indices]].float()
            lm_calls = [calls[0] for calls in graph.weights[: len(lm_modules)]]  # [1, heads, S, S] each
            # a vision layer is called once for all images (batched) or once per image
            vision_calls = [calls for calls in graph.weights[len(lm_modules):] if calls]
            flat_vision = [call for calls in vision_calls for call in calls]
            grads = _gradients(targets, lm_calls + flat_vision)
        lm_grads, vision_grads = grads[: len(lm_calls)], grads[len(lm_calls):]
        # per vision layer and image: (attention [heads, n, n], gradient [targets, heads, n, n] or None)
        per_image = []
        cursor = 0
        for calls in vision_calls:
            pairs = []
            for call in calls:
                gradient = vision_grads[cursor]
                cursor += 1
                pairs.extend((call[b].detach(), None if gradient is None else gradient[:, b])
                             for b in range(call.shape[0]))
            per_image.append(pairs)

        results = []
        for k, t in enumerate(token_indices):
            abars = [head_mean_relevance(g[k, 0], a[0].detach()) for g, a in zip(lm_grads, lm_calls, strict=True)]
            row = propagate_row(abars, sources[k]).cpu().numpy()
            lm_maps = split_by_image(trace, row)
            text = row[: sources[k] + 1].copy()
            text[sources[k]] -= 1.0  # drop the identity: text relevance of earlier tokens, R - I
            vit_maps, combined_maps = [], []
            for image_index, layout in enumerate(trace.images if family.vision_relevancy else []):
                abars_vision = [head_mean_relevance(pairs[image_index][1][k], pairs[image_index][0])
                                for pairs in per_image if pairs[image_index][1] is not None]
                vit_map, combined = self._vision_maps(family, model, layout, abars_vision, lm_maps[image_index])
                vit_maps.append(vit_map)
                combined_maps.append(combined)
            results.append(Explanation(
                method=self.name, token_index=t, maps=lm_maps, text_scores=text_only(trace, text),
                variants={"vit": vit_maps, "all": combined_maps} if family.vision_relevancy else {},
                details={"target_logit": float(targets[k].detach())},
            ))
        return results

    @staticmethod
    def _vision_maps(family, model, layout, abars, lm_map):
        groups = family.vision_token_groups(model, layout)
        if not abars:  # the vision tower is frozen out of the graph (no gradient reaches it)
            zeros = np.zeros((layout.rows, layout.cols), dtype=np.float32)
            return zeros, zeros
        relevance = propagate_matrix(abars).cpu()
        summary = relevance[0] if family.vision_readout == "cls" else relevance.mean(0)
        vit = summary.numpy()[groups].sum(-1).reshape(layout.rows, layout.cols)
        spread = np.zeros(relevance.shape[0], dtype=np.float32)
        np.add.at(spread, groups, np.repeat(lm_map.reshape(-1, 1) / groups.shape[1], groups.shape[1], axis=1))
        combined = (torch.from_numpy(spread) @ relevance).numpy()[groups].sum(-1).reshape(layout.rows, layout.cols)
        return vit.astype(np.float32), np.maximum(combined, 0).astype(np.float32)
