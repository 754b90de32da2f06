"""CLEANN causal explanation (Rohekar, Gurwicz, Nisimov, NeurIPS 2023).

One attention head is read as a linear structural model over tokens: covariance C = A A^T of the selected
tokens' attention rows, then correlation; partial correlations give Fisher-z conditional-independence tests
(pseudo sample size = the head dimension). A constraint-based skeleton search over the selected tokens
(optionally token-ordered: conditioning only on earlier tokens, edges oriented earlier -> later) yields the
graph. The explanation is the smallest set of tokens near the target (graph distance <= radius) whose masking
flips the token or strongly lowers its probability, verified by re-scoring the model with the set's input
embeddings replaced by the mean embedding of their modality.
"""

from __future__ import annotations

import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm

from ..capture import AttentionGraph, replay_inputs, scoped_hook
from ..errors import UserInputError
from ..trace import Trace
from .base import Explanation, ExplanationMethod, image_cell_positions, image_token_positions, register_method


def correlation_from_attention(rows: np.ndarray) -> np.ndarray:
    """Correlation of tokens whose attention rows are `rows` [n, keys], from the covariance rows @ rows.T."""
    covariance = rows @ rows.T
    scale = np.sqrt(np.clip(np.diag(covariance), 1e-30, None))
    return np.clip(covariance / np.outer(scale, scale), -1.0, 1.0)


def partial_correlation(correlation: np.ndarray, i: int, j: int, given: tuple[int, ...]) -> float:
    if not given:
        return float(correlation[i, j])
    index = [i, j, *given]
    precision = np.linalg.pinv(correlation[np.ix_(index, index)])
    denominator = np.sqrt(abs(precision[0, 0] * precision[1, 1]))
    return float(-precision[0, 1] / denominator) if denominator > 0 else 0.0


def fisher_z_pvalue(r: float, n_samples: int, n_given: int) -> float:
    """p = 2 (1 - Phi(sqrt(n - |Z| - 3) |z|)), z = 0.5 ln((1 + r) / (1 - r))."""
    r = float(np.clip(r, -1 + 1e-12, 1 - 1e-12))
    z = 0.5 * np.log((1 + r) / (1 - r))
    dof = max(n_samples - n_given - 3, 1)
    return float(2 * (1 - norm.cdf(np.sqrt(dof) * abs(z))))


def learn_skeleton(correlation: np.ndarray, n_samples: int, alpha: float, max_given: int = 2,
                   ordered: bool = True, max_candidates: int = 8) -> set[tuple[int, int]]:
    """Constraint-based skeleton search (the PC / ICD adjacency phase): start complete, remove i - j when some
    set Z of size 0..max_given among their neighbours makes them independent (p > alpha). Nodes are in token
    order; with `ordered`, Z holds only tokens earlier than the later of the pair."""
    n = correlation.shape[0]
    adjacent = {i: set(range(n)) - {i} for i in range(n)}
    for size in range(max_given + 1):
        for i, j in itertools.combinations(range(n), 2):
            if j not in adjacent[i]:
                continue
            pool = (adjacent[i] | adjacent[j]) - {i, j}
            if ordered:
                pool = {k for k in pool if k < j}
            if len(pool) < size:
                continue
            # the most correlated neighbours first; a bounded pool keeps the search in seconds
            ranked = sorted(pool, key=lambda k: -abs(correlation[i, k]) - abs(correlation[j, k]))[:max_candidates]
            for given in itertools.combinations(ranked, size):
                p_value = fisher_z_pvalue(partial_correlation(correlation, i, j, given), n_samples, size)
                if p_value > alpha:
                    adjacent[i].discard(j)
                    adjacent[j].discard(i)
                    break
    return {(i, j) for i in range(n) for j in adjacent[i] if i < j}


def distances_from(target: int, edges: set[tuple[int, int]], n: int) -> dict[int, int]:
    neighbours = {i: set() for i in range(n)}
    for i, j in edges:
        neighbours[i].add(j)
        neighbours[j].add(i)
    distance, queue = {target: 0}, deque([target])
    while queue:
        node = queue.popleft()
        for other in neighbours[node] - distance.keys():
            distance[other] = distance[node] + 1
            queue.append(other)
    return distance


@dataclass
class HeadResult:
    head: int
    nodes: list[int]  # sequence positions, in token order
    edges: list[tuple[int, int]]  # positions, earlier -> later
    candidates: list[int]  # positions near the target, most promising first


def select_nodes(trace: Trace, target_row: np.ndarray, source: int, threshold: float, max_image: int) -> list[int]:
    """Top-k image tokens by the target's attention (k = min(max(2, #above threshold), max_image)), the text
    tokens above the threshold, and the target itself."""
    images = image_cell_positions(trace)
    k = min(max(2, int((target_row[images] > threshold).sum())), max_image, len(images))
    chosen = set(images[np.argsort(-target_row[images], kind="stable")[:k]].tolist())
    in_image = image_token_positions(trace)  # separators are the image's too, never text
    special = set(trace.special_token_ids)
    chosen |= {j for j in range(source) if j not in in_image and target_row[j] > threshold
               and int(trace.input_ids[j]) not in special}
    chosen.add(source)
    return sorted(chosen)


def discover(trace: Trace, attention: np.ndarray, head: int, source: int, *, threshold: float, max_image: int,
             alpha: float, n_samples: int, radius: int, ordered: bool, max_given: int) -> HeadResult:
    """Causal discovery around the target for one head; `attention` is that head's [S, S] matrix."""
    nodes = select_nodes(trace, attention[source], source, threshold, max_image)
    correlation = correlation_from_attention(attention[nodes].astype(np.float64))
    edges = learn_skeleton(correlation, n_samples, alpha, max_given=max_given, ordered=ordered)
    target = nodes.index(source)
    distance = distances_from(target, edges, len(nodes))
    near = [k for k, d in distance.items() if 0 < d <= radius]
    near.sort(key=lambda k: (distance[k], -attention[source, nodes[k]]))
    return HeadResult(head=head, nodes=nodes, edges=[(nodes[i], nodes[j]) for i, j in sorted(edges)],
                      candidates=[nodes[k] for k in near])


def _replace_embeddings(family, positions: list[int], replacement: dict[int, torch.Tensor], images):
    """A decoder pre-hook that puts `replacement[p]` in place of the input embedding at each position p (and masks
    the family's other image inputs there; `images`: each image's cell positions)."""
    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or not positions:
            return None
        embeds = embeds.clone()
        for position in positions:
            embeds[:, position] = replacement[position].to(embeds.dtype)
        return args, family.mask_image_side_inputs({**kwargs, "inputs_embeds": embeds}, positions, images)
    return hook


class _Scorer:
    """Probability of the target token with a set of positions masked."""

    def __init__(self, loaded, trace: Trace, token_index: int):
        self.loaded, self.trace, self.token_index = loaded, trace, token_index
        self.decoder = loaded.family.language_model(loaded.model)
        embeds = self._input_embeddings()
        in_image = np.zeros(trace.input_ids.shape[0], dtype=bool)
        replacement = {}
        for layout in trace.images:
            in_image[layout.token_positions] = True  # separators too: they are no text
            cells = layout.cell_positions
            mean = embeds[torch.from_numpy(cells)].mean(0)
            replacement.update({int(p): mean for p in cells})
        text_mean = embeds[: trace.prompt_length][~in_image[: trace.prompt_length]].mean(0)
        self.replacement = {p: replacement.get(p, text_mean) for p in range(trace.input_ids.shape[0])}

    @torch.no_grad()
    def _input_embeddings(self) -> torch.Tensor:
        captured = {}

        def keep(module, args, kwargs):
            captured["embeds"] = kwargs["inputs_embeds"][0].detach()

        with scoped_hook(self.decoder, keep, pre=True):
            self.loaded.model(**replay_inputs(self.trace, self.loaded.device))
        return captured["embeds"]

    @torch.no_grad()
    def __call__(self, positions: list[int]) -> tuple[float, bool]:
        """(probability of the token, whether it is still the argmax) with `positions` masked."""
        images = [layout.cell_positions for layout in self.trace.images]
        with scoped_hook(self.decoder, _replace_embeddings(self.loaded.family, positions, self.replacement, images),
                         pre=True):
            logits = self.loaded.model(**replay_inputs(self.trace, self.loaded.device)).logits[0]
        row = logits[self.trace.source_position(self.token_index)].float()
        token = self.trace.answer_ids[self.token_index]
        return float(torch.softmax(row, -1)[token]), bool(row.argmax() == token)


def smallest_explaining_prefix(scorer: _Scorer, candidates: list[int], prob_before: float,
                               drop_to: float) -> tuple[list[int], float, bool]:
    """Binary search for the shortest prefix of `candidates` whose masking flips the token or brings its
    probability to <= drop_to * before; falls back to the whole candidate list, flagged as not reaching it."""
    def explains(k):
        probability, still_argmax = scorer(candidates[:k])
        return (not still_argmax or probability <= drop_to * prob_before), probability

    if not candidates:
        return [], prob_before, False
    ok, probability = explains(len(candidates))
    if not ok:
        return candidates, probability, False
    low, high, best = 1, len(candidates), (len(candidates), probability)
    while low < high:
        middle = (low + high) // 2
        ok, probability = explains(middle)
        if ok:
            high, best = middle, (middle, probability)
        else:
            low = middle + 1
    if best[0] != low:
        best = (low, explains(low)[1])
    return candidates[: best[0]], best[1], True


@register_method
class Cleann(ExplanationMethod):
    name = "cleann"
    description = "CLEANN: a minimal causal set of image patches and text tokens from one head's attention " \
                  "graph, verified by masking and re-scoring the token."

    def explain(self, trace, token_index, model=None, layer: int = -1, head: int | str = "all", alpha: float = 1e-5,
                threshold: float = 0.005, radius: int = 3, max_image_tokens: int = 50, ordered: bool = True,
                max_given: int = 2, drop_to: float = 0.5, among: str = "all", samples: int | None = None):
        """`among`: which tokens may form the explaining set: "all", "image" (patches only) or "text".
        `samples`: the CI tests' pseudo sample size (default: the head dimension, as in the paper)."""
        if model is None:
            raise UserInputError("cleann needs the model that generated the trace (to verify by masking)")
        trace.check_token_index(token_index)
        if among not in ("all", "image", "text"):
            raise UserInputError(f"cleann: among must be all, image or text, got {among!r}")
        if not 0 < alpha < 1 or not 0 <= threshold < 1 or radius < 1 or not 0 < drop_to < 1:
            raise UserInputError("cleann options: alpha in (0, 1), threshold in [0, 1), radius >= 1, "
                                 "drop_to in (0, 1)")
        n_layers = trace.n_layers
        layer_index = layer + n_layers if isinstance(layer, int) and layer < 0 else layer
        if not isinstance(layer_index, int) or not 0 <= layer_index < n_layers:
            raise UserInputError(f"layer {layer!r} is out of range: the model has {n_layers} layers")
        if head != "all" and not (isinstance(head, int) or str(head).strip().lstrip("-").isdigit()):
            raise UserInputError(f"head must be 'all' or a head number, got {head!r}")
        heads = list(range(trace.n_heads)) if head == "all" else [int(head)]
        if not all(0 <= h < trace.n_heads for h in heads):
            raise UserInputError(f"head {head!r} is out of range: the model has {trace.n_heads} heads")

        attention = self._layer_attention(model, trace, layer_index)  # [heads, S, S]
        source = trace.source_position(token_index)
        config = model.model.config.get_text_config()
        n_samples = samples or getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if n_samples < 4:
            raise UserInputError(f"cleann: the pseudo sample size must be at least 4, got {n_samples}")
        options = dict(threshold=threshold, max_image=max_image_tokens, alpha=alpha, n_samples=n_samples,
                       radius=radius, ordered=ordered, max_given=max_given)
        with ThreadPoolExecutor(max_workers=min(4, len(heads))) as pool:
            discovered = list(pool.map(lambda h: discover(trace, attention[h], h, source, **options), heads))

        scorer = _Scorer(model, trace, token_index)
        prob_before, _ = scorer([])
        in_image = image_token_positions(trace)
        allowed = {"all": lambda p: True, "image": lambda p: p in in_image, "text": lambda p: p not in in_image}[among]
        best = None
        for result in discovered:
            candidates = [p for p in result.candidates if allowed(p)]
            chosen, prob_after, reached = smallest_explaining_prefix(scorer, candidates, prob_before, drop_to)
            key = (not reached, len(chosen) if reached else -(prob_before - prob_after), prob_after)
            if best is None or key < best[0]:
                best = (key, result, chosen, prob_after, reached)
        _, result, chosen, prob_after, reached = best
        return self._explanation(trace, token_index, result, chosen, prob_before, prob_after, reached, layer_index)

    @staticmethod
    def _layer_attention(loaded, trace: Trace, layer: int) -> np.ndarray:
        module = loaded.family.language_attentions(loaded.model)[layer]
        with torch.no_grad(), AttentionGraph([module]) as graph:
            loaded.model(**replay_inputs(trace, loaded.device))
        return graph.weights[0][0][0].float().cpu().numpy()

    @staticmethod
    def _explanation(trace, token_index, result, chosen, prob_before, prob_after, reached, layer):
        """The chosen set as cells of each image's map (`image_cells`), cells of its other views (`view_cells`, by
        view name, for tiled families) and text positions: together, exactly the set that was masked."""
        maps, cells, view_cells = [], [], {}
        chosen_list = list(set(chosen))
        for image_index, layout in enumerate(trace.images):
            for view_index, view in enumerate(layout.views):
                grid = np.isin(view.positions, chosen_list).astype(np.float32)
                found = [[row, col] if len(trace.images) == 1 else [image_index, row, col]
                         for row, col in np.argwhere(grid > 0).tolist()]
                if view_index == 0:
                    cells += found
                    maps.append(grid)
                elif found:
                    view_cells.setdefault(view.name, []).extend(found)
        in_image = image_token_positions(trace)
        text_tokens = sorted(p for p in chosen if p not in in_image)
        text_scores = np.zeros(trace.source_position(token_index) + 1, dtype=np.float32)
        text_scores[text_tokens] = 1.0
        return Explanation(
            method="cleann", token_index=token_index, maps=maps, text_scores=text_scores,
            details={
                "image_cells": cells,
                "view_cells": view_cells,
                "text_tokens": text_tokens,
                "prob_before": prob_before,
                "prob_after": prob_after,
                "verified": reached,
                "layer": layer,
                "head": result.head,
                "nodes": result.nodes,
                "edges": [list(edge) for edge in result.edges],
            },
        )
