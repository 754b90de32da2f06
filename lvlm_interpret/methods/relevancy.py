"""Relevancy maps (Chefer, Gur, Wolf 2021, rules 5-6), as LVLM-Interpret uses them, done efficiently.

For target y_t with raw logit s at its source position p: for every LM layer, G = ds/dA,
Abar = mean over heads of relu(G * A), and R <- R + Abar @ R from R = I. Only row p of the final R is
needed, so it is propagated as a row vector from the last layer down (O(S^2) per layer instead of O(S^3)).
Gradients come from one teacher-forced forward over the final sequence with grad enabled, shared by all the
targets, and batched backwards (`is_grads_batched`) over chunks of targets sized to a memory budget, never from
the decoding graph.
Variants: "vit" (the same rules through the vision tower, read from its summary row) and "all" (the LM
relevancy of the image tokens pushed through the vision tower's relevancy matrix). The tower may encode an image as
one sequence, several tiles or windows, or several images as one masked sequence: each layer is read as
block-diagonal over the tower's token sequence, and the family adapter says which tower tokens make each map cell.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..capture import AttentionGraph, replay_inputs
from ..errors import UserInputError
from .base import Explanation, ExplanationMethod, register_method, split_by_image, text_only


def head_mean_relevance(gradient: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Abar = mean over heads of relu(G * A): [..., heads, q, k] -> [..., q, k]."""
    return torch.relu(gradient.float() * attention.float()).mean(-3)


def propagate_rows(abars: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """rows @ R with R = (I + Abar_L) ... (I + Abar_1), layers in forward order. Batched: rows [..., S] with
    abars [..., S, S] (one set per row) or [S, S] (shared). Row vectors need O(S^2) per layer, not R's O(S^3)."""
    for abar in reversed(abars):
        rows = rows + (rows.unsqueeze(-2) @ abar).squeeze(-2)
    return rows


def propagate_row(abars: list[torch.Tensor], position: int) -> torch.Tensor:
    """Row `position` of R."""
    row = torch.zeros(abars[0].shape[-1], dtype=torch.float32, device=abars[0].device)
    row[position] = 1.0
    return propagate_rows(abars, row)


def propagate_block_rows(layers: list[list[tuple[int, torch.Tensor]]], rows: torch.Tensor) -> torch.Tensor:
    """`propagate_rows` for block-diagonal Abars given as (first index, abar [..., n, n]) blocks per layer, in forward
    order; rows [..., m, size] (abars with a leading dimension apply to the rows' leading dimension)."""
    for blocks in reversed(layers):
        updated = rows.clone()
        for first, abar in blocks:
            block = slice(first, first + abar.shape[-1])
            updated[..., block] += rows[..., block] @ abar
        rows = updated
    return rows


def _gradients(targets: torch.Tensor, inputs: list[torch.Tensor], keep_graph: bool) -> list[torch.Tensor | None]:
    """d target_k / d input for every target k at once: each result is [n_targets, *input.shape] or None."""
    if targets.shape[0] == 1:
        grads = torch.autograd.grad(targets[0], inputs, allow_unused=True, retain_graph=keep_graph)
        return [None if g is None else g[None] for g in grads]
    eye = torch.eye(targets.shape[0], dtype=targets.dtype, device=targets.device)
    return list(torch.autograd.grad(targets, inputs, grad_outputs=eye, is_grads_batched=True, allow_unused=True,
                                    retain_graph=keep_graph))


@register_method
class Relevancy(ExplanationMethod):
    name = "relevancy"
    description = "Gradient-weighted attention relevancy (Chefer et al.) through the LM; variants through the " \
                  "vision tower (vit) and both combined (all)."

    def explain(self, trace, token_index, model=None, **options):
        return self.explain_many(trace, [token_index], model=model, **options)[0]

    def explain_many(self, trace, token_indices, model=None, chunk_size: int | None = None, memory_mb: float = 1024,
                     vision: bool = True):
        """One forward for all tokens; batched backwards over chunks of `chunk_size` targets (default: as many
        as fit their attention gradients in `memory_mb`). `vision=False` leaves the tower out (no `vit` / `all`
        variants): its attention then runs without being kept, which spares memory on towers that see many tiles."""
        if model is None:
            raise UserInputError("relevancy needs the model that generated the trace")
        if chunk_size is not None and chunk_size < 1:
            raise UserInputError(f"chunk size must be at least 1, got {chunk_size}")
        if memory_mb <= 0:
            raise UserInputError(f"memory_mb must be positive, got {memory_mb}")
        if not isinstance(vision, bool):
            raise UserInputError(f"relevancy: vision must be true or false, got {vision!r}")
        for t in token_indices:
            trace.check_token_index(t)
        token_indices = list(token_indices)
        family, model_module = model.family, model.model
        lm_modules = family.language_attentions(model_module)
        vision_modules = family.vision_attentions(model_module) if vision else []
        results = []
        with torch.enable_grad(), AttentionGraph(lm_modules + vision_modules) as graph:
            logits = model_module(**replay_inputs(trace, model.device)).logits[0]
            sources = [trace.source_position(t) for t in token_indices]
            targets = logits[sources, [trace.answer_ids[t] for t in token_indices]].float()
            lm_calls = [calls[0] for calls in graph.weights[: len(lm_modules)]]  # [1, heads, S, S] each
            # a vision layer is called once for all images (batched), or once per image, tile or window
            vision_calls = [calls for calls in graph.weights[len(lm_modules):] if calls]
            inputs = lm_calls + [call for calls in vision_calls for call in calls]
            if chunk_size is None:
                per_target = sum(x.numel() * x.element_size() for x in inputs)
                chunk_size = max(1, int(memory_mb * 2 ** 20 // per_target))
            for start in range(0, len(token_indices), chunk_size):
                chunk = slice(start, start + chunk_size)
                grads = _gradients(targets[chunk], inputs, keep_graph=start + chunk_size < len(token_indices))
                results.extend(self._explanations(trace, family, model_module, token_indices[chunk],
                                                  sources[chunk], targets[chunk].detach(), lm_calls,
                                                  vision_calls if vision else None, grads))
        return results

    def _explanations(self, trace, family, model, token_indices, sources, targets, lm_calls, vision_calls, grads):
        lm_grads, vision_grads = grads[: len(lm_calls)], grads[len(lm_calls):]
        # every target of the chunk at once: abars [targets, S, S] per layer, rows [targets, S]
        abars = [head_mean_relevance(g[:, 0], a[0].detach()) for g, a in zip(lm_grads, lm_calls, strict=True)]
        start_rows = torch.zeros(len(sources), abars[0].shape[-1], dtype=torch.float32, device=abars[0].device)
        start_rows[range(len(sources)), sources] = 1.0
        rows = propagate_rows(abars, start_rows).cpu().numpy()
        lm_maps = [split_by_image(trace, row) for row in rows]
        vision = None if vision_calls is None else \
            self._vision_maps(trace, family, model, vision_calls, vision_grads, lm_maps)
        results = []
        for k, t in enumerate(token_indices):
            text = rows[k, : sources[k] + 1].copy()
            text[sources[k]] -= 1.0  # drop the identity: text relevance of earlier tokens, R - I
            results.append(Explanation(
                method=self.name, token_index=t, maps=lm_maps[k], text_scores=text_only(trace, text),
                variants={} if vision is None else {"vit": vision[0][k], "all": vision[1][k]},
                details={"target_logit": float(targets[k])},
            ))
        return results

    @staticmethod
    def _vision_maps(trace, family, model, vision_calls, vision_grads, lm_maps):
        """Per target: the vit and the combined map of every image.

        The tower's attention calls, in call then batch order, cover its token sequence in order (one call for all
        images, one per image, per tile or per window), so every layer is a block-diagonal matrix over that
        sequence; R is needed only through two rows per image (its summary rows, and its LM map spread over the
        tower tokens of its cells), propagated block by block. None where no gradient reaches the tower (nothing to
        show) or the tower's sequence is not the one the adapter describes (then the LM map still stands)."""
        tokens = [family.vision_tokens(model, layout) for layout in trace.images]
        offsets = np.cumsum([0] + [part.count for part in tokens])
        size = int(offsets[-1])
        layers = []  # per layer: (first token, Abar [targets, n, n]) per block
        cursor = 0
        for calls in vision_calls:
            blocks, first = [], 0
            for call in calls:
                gradient = vision_grads[cursor]
                cursor += 1
                for b in range(call.shape[0]):
                    if gradient is not None:  # None: the block is frozen out of the graph
                        blocks.append((first, head_mean_relevance(gradient[:, b], call[b].detach())))
                    first += call.shape[-1]
            if first != size:
                warnings.warn(f"{family.name}: the vision tower attends over {first} tokens, but the adapter places "
                              f"the images on {size}: relevancy gives the LM map only", stacklevel=2)
                return None
            layers.append(blocks)
        if not any(layers):
            return None
        n_targets = len(lm_maps)
        # starting rows [targets, 2 * images, size]: image i's summary row, then its LM map spread over its tokens
        start = np.zeros((n_targets, 2 * len(tokens), size), dtype=np.float32)
        for i, (part, offset) in enumerate(zip(tokens, offsets, strict=False)):
            start[:, 2 * i, offset + part.readout] = 1.0 / len(part.readout)
            for target in range(n_targets):
                np.add.at(start[target, 2 * i + 1], offset + part.groups,
                          lm_maps[target][i].reshape(-1, 1) * part.shares)
        # propagated where the gradients are (the accelerator), read back once
        device = next(abar for blocks in layers for _, abar in blocks).device
        rows = propagate_block_rows(layers, torch.from_numpy(start).to(device)).cpu().numpy()
        vit, combined = [], []
        for target in range(n_targets):
            vit.append([])
            combined.append([])
            for i, (part, layout) in enumerate(zip(tokens, trace.images, strict=True)):
                # a cell reads its tokens by their shares, scaled to a sum over k tokens
                cells, scale = offsets[i] + part.groups, part.shares * part.groups.shape[1]
                # vit reads R - I from the summary rows: with a CLS readout the identity sits on CLS, in no cell;
                # with a mean readout it would add the same 1/N to every cell and drown what the attention moved
                moved = rows[target, 2 * i] - start[target, 2 * i]
                vit[-1].append((moved[cells] * scale).sum(-1).reshape(layout.rows, layout.cols).astype(np.float32))
                combined[-1].append(np.maximum((rows[target, 2 * i + 1][cells] * scale).sum(-1), 0)
                                    .reshape(layout.rows, layout.cols).astype(np.float32))
        return vit, combined
