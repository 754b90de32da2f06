"""CLEANN causal explanation (Rohekar, Gurwicz, Nisimov, NeurIPS 2023).

One layer's attention is read as a linear structural model over tokens: covariance C = A A^T of the selected
tokens' attention rows, then correlation; partial correlations give Fisher-z conditional-independence tests
(pseudo sample size = the head dimension). The nodes are the target and the top tokens of its attention row (image
cells and text alike, as the reference code). A token-ordered constraint-based skeleton search (conditioning sets
drawn from the later token's earlier neighbours, as the reference's ordered ICD) gives each head's graph; the
measured preset joins the heads' graphs. The explanation is the smallest set of tokens near the target (graph
distance <= radius) whose masking flips the token or halves its probability, verified by re-scoring the model
with the set's input embeddings replaced by the mean embedding of their modality. The measured preset grows the
set as regions: from the graph's candidates through neighbouring cells, ordered by the attention of the heads
that concentrate on few cells, so that a set can cover the whole object a model reads, and drops each part of the
set (cells joined through neighbouring cells) that the change does not need. PRESETS["paper"] keeps the paper's
settings (last layer, each head alone, alpha 1e-5, single tokens)."""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm

from ..capture import AttentionGraph, replay_inputs, scoped_hook
from ..errors import UserInputError
from ..trace import Trace
from .base import Explanation, ExplanationMethod, image_token_positions, register_method


def correlation_from_attention(rows: np.ndarray) -> np.ndarray:
    """Correlation of tokens whose attention rows are `rows` [n, keys], from the covariance rows @ rows.T."""
    covariance = rows @ rows.T
    scale = np.sqrt(np.clip(np.diag(covariance), 1e-30, None))
    return np.clip(covariance / np.outer(scale, scale), -1.0, 1.0)


def partial_correlations_given_one(correlation: np.ndarray, i: int, j: int, given: np.ndarray) -> np.ndarray:
    """r(i, j | k) for each k of `given` at once, by the closed form (no matrix inverse): the skeleton search's most
    frequent test."""
    r_ik, r_jk = correlation[i, given], correlation[j, given]
    denominator = np.sqrt(np.clip((1 - r_ik ** 2) * (1 - r_jk ** 2), 0.0, None))
    return np.divide(correlation[i, j] - r_ik * r_jk, denominator, out=np.zeros_like(denominator, dtype=np.float64),
                     where=denominator > 0)


def partial_correlation(correlation: np.ndarray, i: int, j: int, given: tuple[int, ...]) -> float:
    if not given:
        return float(correlation[i, j])
    if len(given) == 1:
        return float(partial_correlations_given_one(correlation, i, j, np.array(given))[0])
    index = [i, j, *given]
    precision = np.linalg.pinv(correlation[np.ix_(index, index)])
    denominator = np.sqrt(abs(precision[0, 0] * precision[1, 1]))
    return float(-precision[0, 1] / denominator) if denominator > 0 else 0.0


def fisher_z_pvalue(r: float, n_samples: int, n_given: int) -> float:
    """p = 2 (1 - Phi(sqrt(n - |Z| - 3) |z|)), z = 0.5 ln((1 + r) / (1 - r))."""
    r = min(max(float(r), -1 + 1e-12), 1 - 1e-12)
    z = 0.5 * math.log((1 + r) / (1 - r))
    dof = max(n_samples - n_given - 3, 1)
    return math.erfc(math.sqrt(dof) * abs(z) / math.sqrt(2))  # = 2 (1 - Phi(.)), exact in the far tail too


def learn_skeleton(correlation: np.ndarray, n_samples: int, alpha: float, max_given: int = 2,
                   ordered: bool = True, max_candidates: int = 8) -> set[tuple[int, int]]:
    """Constraint-based skeleton search (the PC / ICD adjacency phase): start complete, remove i - j when some
    set Z of size 0..max_given makes them independent (p > alpha). Nodes are in token order. With `ordered` (the
    reference's ordered ICD), Z is drawn from the later node's earlier neighbours; without it, from both nodes'
    neighbours (PC)."""
    n = correlation.shape[0]
    # unconditional tests at once: |r| below the Fisher-z critical value is independence
    critical = math.tanh(norm.isf(alpha / 2) / math.sqrt(max(n_samples - 3, 1)))
    dependent = np.abs(correlation) > critical
    np.fill_diagonal(dependent, False)
    adjacent = {i: set(np.flatnonzero(dependent[i]).tolist()) for i in range(n)}
    for size in range(1, max_given + 1):
        critical = math.tanh(norm.isf(alpha / 2) / math.sqrt(max(n_samples - size - 3, 1)))
        for i, j in itertools.combinations(range(n), 2):
            if j not in adjacent[i]:
                continue
            pool = {k for k in adjacent[j] if k < j} - {i} if ordered else (adjacent[i] | adjacent[j]) - {i, j}
            if len(pool) < size:
                continue
            # the most correlated neighbours first; a bounded pool keeps the search in milliseconds
            pool = np.array(sorted(pool))
            ranked = pool[np.argsort(-np.abs(correlation[i, pool]) - np.abs(correlation[j, pool]),
                                     kind="stable")[:max_candidates]]
            if size == 1:  # every single-token set at once; |r| < critical is p > alpha, as above
                independent = bool((np.abs(partial_correlations_given_one(correlation, i, j, ranked)) < critical).any())
            else:
                independent = any(fisher_z_pvalue(partial_correlation(correlation, i, j, given), n_samples, size)
                                  > alpha for given in itertools.combinations(ranked.tolist(), size))
            if independent:
                adjacent[i].discard(j)
                adjacent[j].discard(i)
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
    head: int | str  # a head number, or "union" for the union of every head's graph
    nodes: list[int]  # sequence positions, in token order
    edges: list[tuple[int, int]]  # positions, earlier -> later
    candidates: list[int]  # positions near the target, nearest and most attended first


def select_nodes(trace: Trace, target_row: np.ndarray, source: int, threshold: float, max_nodes: int) -> list[int]:
    """As the reference: the top-k tokens of the target's whole attention row (k = min(max(2, #above threshold),
    max_nodes)), image cells and text alike, without special tokens and image separators, and the target."""
    cells = {int(p) for layout in trace.images for p in layout.cell_positions}
    in_image = image_token_positions(trace)
    special = set(trace.special_token_ids)  # the image placeholder is one: cells are taken by position
    eligible = np.array([j for j in range(source) if j in cells or (j not in in_image and
                                                                      int(trace.input_ids[j]) not in special)],
                        dtype=np.int64)
    k = min(max(2, int((target_row[eligible] > threshold).sum())), max_nodes, len(eligible))
    chosen = set(eligible[np.argsort(-target_row[eligible], kind="stable")[:k]].tolist())
    chosen.add(source)
    return sorted(chosen)


def discover(trace: Trace, attention: np.ndarray, heads: list[int], source: int, *, threshold: float,
             max_nodes: int, alpha: float, n_samples: int, radius: int, ordered: bool, max_given: int) -> HeadResult:
    """Causal discovery around the target. `attention`: the layer's [heads, S, S]; with several heads the nodes are
    chosen by their mean row and the graph is the union of each head's skeleton (a head that reads the object
    connects it to the target even where the others do not)."""
    row = attention[heads, source].mean(0)
    nodes = select_nodes(trace, row, source, threshold, max_nodes)
    edges = set()
    for head in heads:
        edges |= learn_skeleton(correlation_from_attention(attention[head][nodes].astype(np.float64)), n_samples,
                                alpha, max_given=max_given, ordered=ordered)
    target = nodes.index(source)
    distance = distances_from(target, edges, len(nodes))
    near = [k for k, d in distance.items() if 0 < d <= radius]
    near.sort(key=lambda k: (distance[k], -row[nodes[k]]))
    return HeadResult(head=heads[0] if len(heads) == 1 else "union", nodes=nodes,
                      edges=[(nodes[i], nodes[j]) for i, j in sorted(edges)], candidates=[nodes[k] for k in near])


def cell_neighbours(trace: Trace) -> dict[int, list[int]]:
    """Each image cell's position -> the positions of its 8 neighbours in the same grid (view)."""
    neighbours = {}
    for layout in trace.images:
        for view in layout.views:
            grid = view.positions
            rows, cols = grid.shape
            for r in range(rows):
                for c in range(cols):
                    neighbours[int(grid[r, c])] = [int(grid[r + dr, c + dc]) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                                                   if (dr or dc) and 0 <= r + dr < rows and 0 <= c + dc < cols]
    return neighbours


def grow_region(candidates: list[int], score: np.ndarray, neighbours: dict[int, list[int]], allowed, budget: int
                ) -> list[int]:
    """The order in which a set grows: from the graph's candidates and the image cells next to those already
    taken, the one the target attends to most, until `budget` tokens. Cells next to the set fill in the object
    the graph saw only part of; a candidate elsewhere starts another region (a second object of the class)."""
    order, taken = [], set()
    options = {p for p in candidates if allowed(p)}
    while options and len(order) < budget:
        best = max(options, key=lambda p: (score[p], -p))
        order.append(best)
        taken.add(best)
        options |= {q for q in neighbours.get(best, ()) if allowed(q)}
        options -= taken
    return order


class _TraceDecoderInputs:
    """The decoder's keyword inputs over a trace's whole sequence (its input embeddings and whatever else the
    family passes it: positions, masks, DeepStack features), from one forward of the whole model: every token of the
    trace reuses them. It keeps the most recently explained trace's only and lets it go with the trace."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entry = None  # (weak reference to the trace, weak reference to the model, the inputs)

    def _forget(self, trace_reference) -> None:
        entry = self._entry
        if entry is not None and entry[0] is trace_reference:
            self._entry = None

    @torch.no_grad()
    def get(self, loaded, trace: Trace) -> dict:
        with self._lock:
            entry = self._entry
            if entry is None or entry[0]() is not trace or entry[1]() is not loaded.model:
                captured = {}
                with scoped_hook(loaded.family.language_model(loaded.model),
                                 lambda module, args, kwargs: captured.update(kwargs), pre=True):
                    loaded.model(**replay_inputs(trace, loaded.device))
                entry = (weakref.ref(trace, self._forget), weakref.ref(loaded.model), captured)
                self._entry = entry
            return entry[2]


_DECODER_INPUTS = _TraceDecoderInputs()


def _cut_sequence(value, length: int, full: int):
    """A decoder input cut to the first `length` of its `full` positions: the last axis of per-position tensors
    (masks, position ids; a 4-d mask's query axis too), each entry of a dict of masks; anything else as it is."""
    if isinstance(value, dict):
        return {name: _cut_sequence(entry, length, full) for name, entry in value.items()}
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[-1] != full:
        return value
    value = value[..., :length]
    return value[..., :length, :] if value.dim() == 4 and value.shape[-2] == full else value


class _Scorer:
    """Probability of the target token with a set of positions masked (input embeddings replaced by their
    modality's mean). Each score runs the decoder alone, from the decoder inputs of one full forward (the vision
    tower's output does not change), over the positions up to the token's source (later ones cannot change it in a
    causal decoder): 30% less time per score on the demo model than the whole model over the whole sequence."""

    def __init__(self, loaded, trace: Trace, token_index: int):
        self.loaded, self.trace, self.token_index = loaded, trace, token_index
        self.decoder = loaded.family.language_model(loaded.model)
        self.lm_head = loaded.family.lm_head(loaded.model)
        self.softcap = getattr(loaded.model.config.get_text_config(), "final_logit_softcapping", None)
        decoder_inputs = _DECODER_INPUTS.get(loaded, trace)
        embeds = decoder_inputs["inputs_embeds"][0]
        in_image = np.zeros(trace.input_ids.shape[0], dtype=bool)
        for layout in trace.images:
            in_image[layout.token_positions] = True  # separators too: they are no text
        text = torch.from_numpy(np.flatnonzero(~in_image[: trace.prompt_length])).to(embeds.device)
        replacement = embeds[text].mean(0).expand_as(embeds).clone()
        for layout in trace.images:
            cells = torch.from_numpy(layout.cell_positions).to(embeds.device)
            replacement[cells] = embeds[cells].mean(0)
        length = trace.source_position(token_index) + 1
        self.replacement = replacement[:length]
        self.inputs = {name: _cut_sequence(value, length, embeds.shape[0]) for name, value in decoder_inputs.items()
                       if name not in ("inputs_embeds", "past_key_values", "use_cache")}
        self.embeds = decoder_inputs["inputs_embeds"][:, :length]
        self.images = [layout.cell_positions for layout in trace.images]
        self._scores = {}  # a set's score, by its sorted positions: searches ask some sets twice

    @torch.no_grad()
    def attention(self, layer: int) -> np.ndarray:
        """The layer's attention [heads, L, L] over the positions up to the token's source, unmasked (the rows of
        those positions are the whole sequence's: a causal decoder's later positions do not reach them)."""
        module = self.loaded.family.language_attentions(self.loaded.model)[layer]
        with AttentionGraph([module]) as graph:
            self.decoder(**self.inputs, inputs_embeds=self.embeds, use_cache=False)
        return graph.weights[0][0][0].float().cpu().numpy()

    @torch.no_grad()
    def __call__(self, positions: list[int]) -> tuple[float, bool]:
        """(probability of the token, whether it is still the argmax) with `positions` masked."""
        key = tuple(sorted(positions))
        if key not in self._scores:
            self._scores[key] = self._score(positions)
        return self._scores[key]

    @torch.no_grad()
    def _score(self, positions: list[int]) -> tuple[float, bool]:
        embeds = self.embeds.clone()
        index = torch.as_tensor(sorted(positions), dtype=torch.long, device=embeds.device)
        embeds[:, index] = self.replacement[index].to(embeds.dtype)
        inputs = {**self.inputs, "inputs_embeds": embeds}
        if positions:
            inputs = self.loaded.family.mask_image_side_inputs(inputs, positions, self.images)
        hidden = self.decoder(**inputs, use_cache=False)[0][0, -1]
        row = self.lm_head(hidden).float()
        if self.softcap is not None:  # as the model's own head (Gemma 2 / PaliGemma 2)
            row = torch.tanh(row / self.softcap) * self.softcap
        token = self.trace.answer_ids[self.token_index]
        return float(torch.softmax(row, -1)[token]), bool(row.argmax() == token)


def changes_token(probability: float, still_argmax: bool, prob_before: float, drop_to: float) -> bool:
    """The verification rule: masking the set flips the token or brings its probability to <= drop_to * before."""
    return not still_argmax or probability <= drop_to * prob_before


def smallest_explaining_prefix(scorer, candidates: list[int], prob_before: float, drop_to: float,
                               whole: tuple[float, bool] | None = None) -> tuple[list[int], float, bool]:
    """Binary search for the shortest prefix of `candidates` whose masking changes the token (`changes_token`);
    falls back to the whole candidate list, flagged as not reaching it (with the whole list's probability).
    `whole`: the whole list's score where already known. Without it the search's first probe, the middle prefix,
    comes first: where it changes the token (the usual case) the whole list need not be scored; else the whole list
    is, and where it does not change the token no longer prefix is searched."""
    def explains(k):
        probability, still_argmax = scorer(candidates[:k])
        return changes_token(probability, still_argmax, prob_before, drop_to), probability

    if not candidates:
        return [], prob_before, False
    low, high, best = 1, len(candidates), None
    if whole is None and high > 1:
        middle = (low + high) // 2
        ok, probability = explains(middle)
        if ok:
            high, best = middle, (middle, probability)
        else:
            low = middle + 1
    if best is None:
        if whole is None:
            ok, probability = explains(len(candidates))
        else:
            ok, probability = changes_token(*whole, prob_before, drop_to), whole[0]
        if not ok:
            return candidates, probability, False
        best = (len(candidates), probability)
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


def smallest_over_orders(scorer, orders: list[list[int]], prob_before: float, drop_to: float
                         ) -> tuple[int, list[int], float, bool]:
    """The smallest explaining prefix over several candidate orders: (the order's index, the set, the probability
    with it masked, verified). Once a set is found, an order is searched only when its prefix one shorter than the
    best set so far changes the token, so an order that cannot do better costs one forward. With none verified:
    the order whose whole list lowered the probability most."""
    best, closest = None, None
    for index, order in enumerate(orders):
        limit = len(order) if best is None else min(len(order), len(best[1]) - 1)
        if limit < 1:
            continue
        whole = None
        if best is not None:
            whole = scorer(order[:limit])
            if not changes_token(*whole, prob_before, drop_to):
                continue
        chosen, probability, reached = smallest_explaining_prefix(scorer, order[:limit], prob_before, drop_to, whole)
        if reached:
            best = (index, chosen, probability, True)
        elif closest is None or probability < closest[2]:
            closest = (index, chosen, probability, False)
    return best or closest or (0, [], prob_before, False)


def connected_parts(chosen: list[int], neighbours: dict[int, list[int]]) -> list[list[int]]:
    """The set's parts: its image cells joined through neighbouring cells of the set; a text token is a part
    alone. In the set's order."""
    remaining, parts = set(chosen), []
    for start in chosen:
        if start not in remaining:
            continue
        remaining.discard(start)
        part, stack = [], [start]
        while stack:
            position = stack.pop()
            part.append(position)
            for other in neighbours.get(position, ()):
                if other in remaining:
                    remaining.discard(other)
                    stack.append(other)
        parts.append(sorted(part, key=chosen.index))
    return parts


def trim_parts(scorer, chosen: list[int], neighbours: dict[int, list[int]], keeps) -> list[int]:
    """The set without each part (`connected_parts`, smallest first) whose removal still `keeps(probability,
    still_argmax)` the set's effect: one forward per part, none for a set of one part."""
    parts = connected_parts(chosen, neighbours)
    if len(parts) < 2:
        return chosen
    kept = list(chosen)
    for part in sorted(parts, key=len):
        rest = [p for p in kept if p not in set(part)]
        if rest and keeps(*scorer(rest)):
            kept = rest
    return kept


def concentration(row: np.ndarray, cells: np.ndarray, top: int = 5) -> float:
    """The share of a head's attention on image cells that its `top` most attended cells hold: a head that
    reads one object concentrates; one that scans the image does not."""
    image = row[cells]
    total = float(image.sum())
    return float(np.sort(image)[::-1][:top].sum() / total) if total > 0 else 0.0


# Defaults measured on the shipped demo model (docs/results.md, "CLEANN on the demo model"); "paper": the
# paper's and reference code's settings (last layer, each head alone, alpha 1e-5, radius 3, single tokens).
PRESETS = {
    "measured": dict(layer="middle", head="union", alpha=1e-3, threshold=0.005, radius=3, max_nodes=50,
                     samples=None, region=True, budget=32, growth_heads=3, max_given=1, trim=True),
    "paper": dict(layer=-1, head="all", alpha=1e-5, threshold=0.005, radius=3, max_nodes=50, samples=None,
                  region=False, budget=0, growth_heads=1, max_given=2, trim=False),
}


@register_method
class Cleann(ExplanationMethod):
    name = "cleann"
    description = "CLEANN: a minimal causal set of image patches and text tokens from one layer's attention " \
                  "graph, verified by masking and re-scoring the token."

    def explain(self, trace, token_index, model=None, preset: str = "measured", layer: int | None = None,
                head: int | str | None = None, alpha: float | None = None, threshold: float | None = None,
                radius: int | None = None, max_nodes: int | None = None, samples: int | None = None,
                region: bool | None = None, budget: int | None = None, growth_heads: int | None = None,
                max_given: int | None = None, trim: bool | None = None, ordered: bool = True, drop_to: float = 0.5,
                among: str = "all"):
        """`preset`: "measured" (defaults chosen on the demo model) or "paper"; every other option left out
        takes the preset's value. `layer`: a layer number (negative from the end); the measured preset takes the
        middle layer (n_layers // 2). `head`: a head number, "all" (each head's graph alone, the best set
        kept) or "union" (one graph, the union of every head's). `samples`: the CI tests' pseudo sample size
        (default: the head dimension, as in the paper). `region`: grow the set from the graph's candidates
        through neighbouring cells (else: the candidates alone, nearest first). `budget`: the most tokens a
        set may hold (0: no limit). `growth_heads`: with head="union", the set grows along the attention of each
        of this many heads (those most concentrated on few image cells) and the smallest verified set is kept.
        `max_given`: the largest conditioning set of the CI tests. `trim`: drop each part of the set (its cells
        joined through neighbouring cells; a text token alone) whose removal keeps the set's effect (the change;
        for the closest set where none changes the token, a probability as low). `among`: which tokens may form the
        set: "all", "image" or "text"."""
        if model is None:
            raise UserInputError("cleann needs the model that generated the trace (to verify by masking)")
        trace.check_token_index(token_index)
        if preset not in PRESETS:
            raise UserInputError(f"cleann: preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        given = dict(layer=layer, head=head, alpha=alpha, threshold=threshold, radius=radius, max_nodes=max_nodes,
                     samples=samples, region=region, budget=budget, growth_heads=growth_heads, max_given=max_given,
                     trim=trim)
        settings = {name: PRESETS[preset][name] if value is None else value for name, value in given.items()}
        if among not in ("all", "image", "text"):
            raise UserInputError(f"cleann: among must be all, image or text, got {among!r}")
        if not 0 < settings["alpha"] < 1 or not 0 <= settings["threshold"] < 1 or settings["radius"] < 1 \
                or not 0 < drop_to < 1 or settings["budget"] < 0 or settings["max_nodes"] < 2 \
                or settings["growth_heads"] < 1 or settings["max_given"] < 0:
            raise UserInputError("cleann options: alpha in (0, 1), threshold in [0, 1), radius >= 1, "
                                 "drop_to in (0, 1), budget >= 0 (0: no limit), max_nodes >= 2, growth_heads >= 1, "
                                 "max_given >= 0")
        n_layers = trace.n_layers
        layer = n_layers // 2 if settings["layer"] == "middle" else settings["layer"]
        layer_index = layer + n_layers if isinstance(layer, int) and layer < 0 else layer
        if not isinstance(layer_index, int) or isinstance(layer_index, bool) or not 0 <= layer_index < n_layers:
            raise UserInputError(f"layer {layer!r} is out of range: the model has {n_layers} layers")
        head = settings["head"]
        if head not in ("all", "union") and not (isinstance(head, int) or str(head).strip().lstrip("-").isdigit()):
            raise UserInputError(f"head must be 'all', 'union' or a head number, got {head!r}")
        if head in ("all", "union"):
            head_sets = [[h] for h in range(trace.n_heads)] if head == "all" else [list(range(trace.n_heads))]
        else:
            head_sets = [[int(head)]]
        if not all(0 <= h < trace.n_heads for heads in head_sets for h in heads):
            raise UserInputError(f"head {head!r} is out of range: the model has {trace.n_heads} heads")

        scorer = _Scorer(model, trace, token_index)
        attention = scorer.attention(layer_index)  # [heads, L, L]: the positions up to the token's source
        source = trace.source_position(token_index)
        config = model.model.config.get_text_config()
        n_samples = settings["samples"] or getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        if n_samples < 4:
            raise UserInputError(f"cleann: the pseudo sample size must be at least 4, got {n_samples}")
        options = dict(threshold=settings["threshold"], max_nodes=settings["max_nodes"], alpha=settings["alpha"],
                       n_samples=n_samples, radius=settings["radius"], ordered=ordered,
                       max_given=settings["max_given"])
        discovered = [discover(trace, attention, heads, source, **options) for heads in head_sets]

        prob_before = math.exp(float(trace.answer_logprobs[token_index]))
        in_image = image_token_positions(trace)
        allowed = {"all": lambda p: True, "image": lambda p: p in in_image, "text": lambda p: p not in in_image}[among]
        budget = settings["budget"] or len(trace.input_ids)
        neighbours = cell_neighbours(trace) if settings["region"] else {}
        cells = np.concatenate([layout.cell_positions for layout in trace.images])
        # the orders a set may grow in, each with the graph it came from
        orders, graphs = [], []
        for result, heads in zip(discovered, head_sets):
            if not settings["region"]:
                orders.append([p for p in result.candidates if allowed(p)][:budget])
                graphs.append(result)
                continue
            ranked = sorted(heads, key=lambda h: -concentration(attention[h, source], cells))
            for growth_head in ranked[: settings["growth_heads"]]:
                orders.append(grow_region(result.candidates, attention[growth_head, source], neighbours, allowed,
                                          budget))
                graphs.append(result)
        index, chosen, prob_after, reached = smallest_over_orders(scorer, orders, prob_before, drop_to)
        tried, prob_tried = len(chosen), prob_after
        if settings["trim"] and chosen:
            if reached:
                def keeps(probability, still_argmax):
                    return changes_token(probability, still_argmax, prob_before, drop_to)
            else:
                def keeps(probability, still_argmax):
                    return probability <= prob_tried
            chosen = trim_parts(scorer, chosen, neighbours, keeps)
            prob_after, still_argmax = scorer(chosen)  # scored already: no forward
            # masking less can change more (a part that held the token up is no longer masked)
            reached = reached or changes_token(prob_after, still_argmax, prob_before, drop_to)
        result = graphs[index]
        message = self._message(trace, token_index, chosen, prob_before, prob_after, reached, tried, prob_tried)
        return self._explanation(trace, token_index, result, chosen, prob_before, prob_after, reached, layer_index,
                                 message)

    @staticmethod
    def _message(trace, token_index, chosen, prob_before, prob_after, reached, tried, prob_tried=None) -> str:
        """`tried`: the size of the largest set tried without changing the token, which lowered p to `prob_tried`
        (where the closest set shown is a shorter part of it)."""
        word = trace.answer_texts[token_index].strip() or trace.answer_texts[token_index]
        if reached:
            return (f"masking these {len(chosen)} tokens changes {word!r}: p {prob_before:.2f} -> {prob_after:.2f}")
        if not chosen:
            return f"the causal graph links no token to {word!r}, so there is no set to test"
        message = (f"no set of up to {tried} tokens changes {word!r}; the closest lowered p from {prob_before:.2f} "
                   f"to {prob_after:.2f}")
        if len(chosen) < tried:
            message += f" (these {len(chosen)} tokens; all {tried}: {prob_tried:.2f})"
        return message

    @staticmethod
    def _explanation(trace, token_index, result, chosen, prob_before, prob_after, reached, layer, message=""):
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
                "message": message,
                "layer": layer,
                "head": result.head,
                "nodes": result.nodes,
                "edges": [list(edge) for edge in result.edges],
            },
        )
