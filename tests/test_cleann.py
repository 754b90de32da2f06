"""CLEANN: the CI test, structure learning and minimal-set search on hand inputs; the method end to end."""

import itertools
import math

import numpy as np
import pytest
import torch
from causallearn.search.ConstraintBased.PC import pc
from causallearn.utils.cit import CIT

from lvlm_interpret import UserInputError, get_method
from lvlm_interpret.methods.cleann import (
    _Scorer, changes_token, correlation_from_attention, fisher_z_pvalue, grow_region, learn_skeleton,
    partial_correlation, smallest_explaining_prefix, smallest_over_orders,
)


def test_fisher_z_pvalue_hand_value():
    r, n, given = 0.5, 20, 0
    z = 0.5 * math.log(1.5 / 0.5)
    statistic = math.sqrt(n - given - 3) * abs(z)
    expected = 2 * (1 - 0.5 * (1 + math.erf(statistic / math.sqrt(2))))
    assert fisher_z_pvalue(r, n, given) == pytest.approx(expected, rel=1e-9)
    assert fisher_z_pvalue(0.0, 128, 2) == pytest.approx(1.0)
    assert fisher_z_pvalue(0.99, 128, 0) < 1e-5


def test_partial_correlation_matches_the_three_variable_formula():
    r_xy, r_xz, r_yz = 0.6, 0.5, 0.4
    correlation = np.array([[1, r_xy, r_xz], [r_xy, 1, r_yz], [r_xz, r_yz, 1]])
    expected = (r_xy - r_xz * r_yz) / math.sqrt((1 - r_xz ** 2) * (1 - r_yz ** 2))
    assert partial_correlation(correlation, 0, 1, (2,)) == pytest.approx(expected)
    assert partial_correlation(correlation, 0, 1, ()) == r_xy


def test_correlation_from_attention_rows():
    correlation = correlation_from_attention(np.array([[1.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(correlation, [[1, 1 / math.sqrt(2)], [1 / math.sqrt(2), 1]])


def test_skeleton_of_a_chain_drops_the_indirect_edge():
    # x -> y -> z: x and z are correlated only through y
    correlation = np.array([[1.0, 0.8, 0.64], [0.8, 1.0, 0.8], [0.64, 0.8, 1.0]])
    assert learn_skeleton(correlation, n_samples=128, alpha=1e-5) == {(0, 1), (1, 2)}
    # independent tokens lose every edge
    assert learn_skeleton(np.eye(4), n_samples=128, alpha=1e-5) == set()


def test_partial_correlation_given_one_token_matches_the_matrix_inverse():
    rng = np.random.default_rng(0)
    rows = rng.random((5, 12))
    correlation = correlation_from_attention(rows)
    precision = np.linalg.inv(correlation[np.ix_([0, 3, 1], [0, 3, 1])])
    expected = -precision[0, 1] / math.sqrt(precision[0, 0] * precision[1, 1])
    assert partial_correlation(correlation, 0, 3, (1,)) == pytest.approx(expected)


def test_ordered_search_conditions_on_the_later_tokens_earlier_neighbours():
    """As the reference's ordered ICD. x2 = 0.9 x0 + e, x3 = 0.31 x2 + e (x1 unrelated): the edge 2 - 3 is real.
    Conditioning it on 0, a neighbour of the earlier token only, weakens the test until the edge is dropped; the
    reference draws the set from 3's earlier neighbours (none but 2) and keeps it."""
    weights = np.zeros((4, 4))
    weights[2, 0], weights[3, 2] = 0.9, 0.31
    mixing = np.linalg.inv(np.eye(4) - weights)
    covariance = mixing @ mixing.T
    scale = np.sqrt(np.diag(covariance))
    correlation = covariance / np.outer(scale, scale)
    assert learn_skeleton(correlation, n_samples=128, alpha=1e-5) == {(0, 2), (2, 3)}
    # the unordered (PC) search may condition on either node's neighbours, later tokens included
    chain = np.array([[1, 0.64, 0, 0.8], [0.64, 1, 0, 0.8], [0, 0, 1, 0], [0.8, 0.8, 0, 1.0]])
    assert (0, 1) in learn_skeleton(chain, n_samples=128, alpha=1e-5, ordered=True)
    assert (0, 1) not in learn_skeleton(chain, n_samples=128, alpha=1e-5, ordered=False)


def test_the_verification_rule():
    # a flipped token is changed whatever its probability; else its probability must at least halve
    assert changes_token(0.9, still_argmax=False, prob_before=0.95, drop_to=0.5)
    assert changes_token(0.45, still_argmax=True, prob_before=0.9, drop_to=0.5)
    assert not changes_token(0.46, still_argmax=True, prob_before=0.9, drop_to=0.5)


def test_a_region_grows_over_the_object_from_one_candidate():
    """A 4 x 4 grid; the target attends to a planted 2 x 2 object (cells 5, 6, 9, 10) and a little to a far cell;
    the graph found only cell 5 and the far cell: the set grows through 5's neighbours to the whole object first."""
    grid = np.arange(16).reshape(4, 4)
    neighbours = {int(grid[r, c]): [int(grid[r + dr, c + dc]) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                                    if (dr or dc) and 0 <= r + dr < 4 and 0 <= c + dc < 4]
                  for r in range(4) for c in range(4)}
    score = np.full(16, 0.001)
    score[[5, 6, 9, 10]] = [0.3, 0.25, 0.2, 0.2]
    score[15] = 0.05
    order = grow_region([5, 15], score, neighbours, allowed=lambda p: True, budget=6)
    assert order[:4] == [5, 6, 9, 10] and order[4] == 15 and len(order) == 6
    # the allowed rule and the budget hold
    assert grow_region([5, 15], score, neighbours, allowed=lambda p: p != 6, budget=3) == [5, 9, 10]


def test_a_part_of_the_set_that_its_effect_does_not_need_is_trimmed():
    """Two parts (cells joined through neighbours; a text token alone): the object and a stray cell far from it,
    and a text token. Only the object is needed: the stray parts go, one forward each, smallest first."""
    from lvlm_interpret.methods.cleann import connected_parts, trim_parts

    neighbours = {0: [1], 1: [0, 2], 2: [1], 9: []}
    chosen = [0, 1, 9, 2, 50]
    assert connected_parts(chosen, neighbours) == [[0, 1, 2], [9], [50]]
    calls = []

    def scorer(positions):
        calls.append(sorted(positions))
        return (0.1, False) if {0, 1, 2} <= set(positions) else (0.9, True)

    assert trim_parts(scorer, chosen, neighbours, lambda probability, still_argmax: not still_argmax) == [0, 1, 2]
    assert calls == [[0, 1, 2, 50], [0, 1, 2]]  # one forward per part; the last part left is not tried
    calls.clear()
    needed = trim_parts(scorer, [5, 0, 1, 2], neighbours, lambda probability, still_argmax: not still_argmax)
    assert needed == [0, 1, 2] and calls == [[0, 1, 2]]  # 5 has no neighbours entry: a part alone
    calls.clear()
    assert trim_parts(scorer, [9, 0, 1], neighbours, lambda probability, still_argmax: not still_argmax) == [9, 0, 1]
    assert calls == [[0, 1], [9]]  # neither part alone keeps the change: both stay
    assert trim_parts(scorer, [0, 1, 2], neighbours, lambda *score: True) == [0, 1, 2]  # one part: no forward


def test_the_smallest_set_over_orders_is_kept_and_a_worse_order_costs_one_forward():
    planted = {5, 6, 9, 10}

    class FakeScorer:
        calls = []

        def __call__(self, positions):
            self.calls.append(list(positions))
            return (0.1, False) if planted <= set(positions) else (0.9, True)

    scorer = FakeScorer()
    wide = [5, 1, 6, 2, 9, 3, 10, 4]  # reaches the object with 7 tokens
    tight = [5, 6, 9, 10, 1, 2, 3, 4]  # with 4
    index, chosen, probability, verified = smallest_over_orders(scorer, [wide, tight, wide], 0.9, 0.5)
    assert (index, chosen, probability, verified) == (1, [5, 6, 9, 10], 0.1, True)
    # the third order is tried once, with one token fewer than the best set, and not searched
    assert scorer.calls[-1] == wide[:3]
    # none verified: the order that lowered the probability most is the closest
    index, chosen, probability, verified = smallest_over_orders(lambda p: (0.8 if 1 in p else 0.6, True),
                                                                [[1, 2], [3, 4]], 0.9, 0.5)
    assert (index, chosen, probability, verified) == (1, [3, 4], 0.6, False)


def test_smallest_prefix_is_found_and_verified():
    class FakeScorer:
        calls = []

        def __call__(self, positions):
            self.calls.append(list(positions))
            return (0.1, False) if 30 in positions else (0.9, True)

    scorer = FakeScorer()
    chosen, probability, reached = smallest_explaining_prefix(scorer, [10, 20, 30, 40, 50], 0.9, 0.5)
    assert chosen == [10, 20, 30] and probability == 0.1 and reached
    # the middle prefix changed the token: the whole list was never scored (one forward saved)
    assert scorer.calls == [[10, 20, 30], [10, 20]]
    chosen, probability, reached = smallest_explaining_prefix(FakeScorer(), [10, 20], 0.9, 0.5)
    assert chosen == [10, 20] and not reached


def test_cleann_end_to_end(llava, llava_trace):
    t = 2
    explanation = get_method("cleann").explain(llava_trace, t, model=llava)
    details = explanation.details
    layout = llava_trace.images[0]
    assert details["prob_before"] == pytest.approx(math.exp(float(llava_trace.answer_logprobs[t])), rel=1e-3)
    # the map marks exactly the reported cells; text tokens are earlier, non-image positions
    marked = {tuple(cell) for cell in zip(*np.nonzero(explanation.maps[0]))}
    assert marked == {tuple(cell) for cell in details["image_cells"]}
    assert all(p < llava_trace.source_position(t) + 1 and p not in layout.token_positions
               for p in details["text_tokens"])
    # re-scoring the reported set independently gives the reported probability
    positions = [int(layout.positions[r, c]) for r, c in details["image_cells"]] + details["text_tokens"]
    probability, still_argmax = _Scorer(llava, llava_trace, t)(positions)
    assert probability == pytest.approx(details["prob_after"], rel=1e-5)
    if details["verified"]:
        assert probability <= 0.5 * details["prob_before"] or not still_argmax
    nodes = set(details["nodes"])
    assert all(a < b and a in nodes and b in nodes for a, b in details["edges"])
    assert llava_trace.source_position(t) in nodes


def test_cleann_can_be_limited_to_image_patches(llava, llava_trace):
    details = get_method("cleann").explain(llava_trace, 1, model=llava, among="image").details
    assert details["text_tokens"] == []


def test_the_explaining_set_grows_as_a_region_and_says_what_it_found(llava, llava_trace):
    """The measured preset masks a region of image cells (8-connected within each component it grows); the
    message states the outcome in words, and the paper's settings stay one option away."""
    details = get_method("cleann").explain(llava_trace, 2, model=llava, among="image").details
    assert details["head"] == "union" and details["layer"] == llava_trace.n_layers // 2
    word = llava_trace.answer_texts[2].strip()
    if details["verified"]:
        assert details["message"].startswith(f"masking these {len(details['image_cells'])} tokens changes {word!r}")
    elif details["image_cells"]:
        assert details["message"].startswith("no set of up to ")
    paper = get_method("cleann").explain(llava_trace, 2, model=llava, preset="paper").details
    assert paper["layer"] == llava_trace.n_layers - 1 and isinstance(paper["head"], int)


def test_nodes_are_the_whole_rows_top_tokens_and_an_unchanged_token_is_said_in_words(llava_trace):
    from lvlm_interpret.methods.cleann import Cleann, HeadResult, select_nodes

    layout = llava_trace.images[0]
    source = llava_trace.source_position(1)
    text = [p for p in range(llava_trace.prompt_length) if p not in layout.token_positions
            and int(llava_trace.input_ids[p]) not in llava_trace.special_token_ids]
    row = np.zeros(llava_trace.input_ids.shape[0])
    row[text[0]], row[layout.positions[0, 1]], row[text[1]] = 0.5, 0.3, 0.004
    # as the reference: text and image tokens compete in one ranking; k = the tokens above the threshold
    assert select_nodes(llava_trace, row, source, 0.005, 50) == sorted([text[0], int(layout.positions[0, 1]), source])
    word = llava_trace.answer_texts[1].strip()
    chosen = [int(layout.positions[0, 1]), text[0]]
    details = Cleann._explanation(llava_trace, 1, HeadResult("union", [], [], chosen), chosen, 0.98, 0.71, False, 0,
                                  Cleann._message(llava_trace, 1, chosen, 0.98, 0.71, False, 2, 0.71)).details
    assert details["message"] == f"no set of up to 2 tokens changes {word!r}; the closest lowered p from 0.98 to 0.71"
    # a closest set cut short of the largest set tried says both
    assert Cleann._message(llava_trace, 1, chosen, 0.98, 0.73, False, 32, 0.71) == (
        f"no set of up to 32 tokens changes {word!r}; the closest lowered p from 0.98 to 0.73 (these 2 tokens; "
        "all 32: 0.71)")
    assert details["image_cells"] == [[0, 1]] and details["text_tokens"] == [text[0]]


@pytest.mark.parametrize("options", [{"layer": 9}, {"head": 7}, {"head": "abc"}, {"head": 1.5}, {"alpha": 2.0},
                                     {"radius": 0}, {"among": "x"}, {"preset": "fast"}, {"budget": -1},
                                     {"growth_heads": 0}])
def test_bad_options(llava, llava_trace, options):
    with pytest.raises(UserInputError):
        get_method("cleann").explain(llava_trace, 0, model=llava, **options)


def test_masking_a_qwen3_vl_image_token_replaces_its_deepstack_features_too(monkeypatch):
    """Qwen3-VL adds DeepStack features to the first LM layers at the image positions: masking a token must replace
    them as well as its input embedding, or the token still reaches the LM."""
    from lvlm_interpret import GenerationOptions, generate_with_capture, load_model
    from tests.conftest import make_scene

    loaded = load_model("random:qwen3_vl", device="cpu")
    trace = generate_with_capture(loaded, [make_scene(200, 90), make_scene(70, 110)], "Describe the images.",
                                  GenerationOptions(max_new_tokens=2, min_new_tokens=2))
    decoder = loaded.family.language_model(loaded.model)
    seen = []
    original = decoder._deepstack_process

    def record(hidden_states, visual_pos_masks, visual_embeds):
        seen.append(visual_embeds.detach().clone())
        return original(hidden_states, visual_pos_masks, visual_embeds)

    monkeypatch.setattr(decoder, "_deepstack_process", record)
    scorer = _Scorer(loaded, trace, 1)
    first, second = (layout.cell_positions.tolist() for layout in trace.images)
    masked = [first[0], first[5], second[2]]
    scorer([])
    unmasked = seen.pop()
    probability, _ = scorer(masked)
    features = seen.pop()
    # the images' cells are the DeepStack rows, in order; a masked row takes its own image's mean
    rows = [0, 5, len(first) + 2]
    own_means = [unmasked[: len(first)].mean(0)] * 2 + [unmasked[len(first):].mean(0)]
    torch.testing.assert_close(features[rows], torch.stack(own_means))
    kept = [r for r in range(unmasked.shape[0]) if r not in rows]
    torch.testing.assert_close(features[kept], unmasked[kept])
    # the features matter: the same masking without them gives another probability
    monkeypatch.setattr(loaded.family, "mask_image_side_inputs", lambda kwargs, positions, images: kwargs)
    assert _Scorer(loaded, trace, 1)(masked)[0] != pytest.approx(probability, rel=1e-6)


def test_a_tiled_images_set_is_reported_whole_across_its_views(models):
    """LLaVA-NeXT: the chosen set may hold tokens of the base view besides the stitched map; the report names them
    by view, so that the reported cells and text tokens are exactly the masked set; separators are never text."""
    from lvlm_interpret import GenerationOptions, generate_with_capture
    from lvlm_interpret.methods.cleann import Cleann, HeadResult, select_nodes
    from tests.conftest import make_scene

    loaded = models("llava_next")
    trace = generate_with_capture(loaded, [make_scene(100, 60)], "Describe the image.",
                                  GenerationOptions(max_new_tokens=2, min_new_tokens=2))
    layout = trace.images[0]
    tiles, base = layout.view("tiles"), layout.view("base")
    text = next(p for p in range(trace.prompt_length) if p not in layout.token_positions)
    chosen = [int(tiles.positions[1, 2]), int(base.positions[0, 3]), text]
    result = HeadResult(head=0, nodes=sorted(chosen), edges=[], candidates=chosen)
    details = Cleann._explanation(trace, 1, result, chosen, 0.5, 0.1, True, 0).details
    assert details["image_cells"] == [[1, 2]] and details["view_cells"] == {"base": [[0, 3]]}
    assert details["text_tokens"] == [text]
    # a row of attention that favours the separators: they are not picked as text nodes
    row = np.zeros(trace.input_ids.shape[0])
    row[layout.separators] = 1.0
    source = trace.source_position(1)
    assert not set(select_nodes(trace, row, source, 0.005, 4)) & set(layout.separators.tolist())
    # end to end: masking the reported set gives the reported probability
    details = get_method("cleann").explain(trace, 1, model=loaded).details
    positions = [int(layout.positions[r, c]) for r, c in details["image_cells"]]
    positions += [int(layout.view(name).positions[r, c]) for name, cells in details["view_cells"].items()
                  for r, c in cells]
    probability, _ = _Scorer(loaded, trace, 1)(positions + details["text_tokens"])
    assert probability == pytest.approx(details["prob_after"], rel=1e-5)


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "mistral3", "internvl", "paligemma",
                                    "gemma3", "idefics3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_a_score_equals_the_whole_models_with_the_set_masked(models, family):
    """The scorer runs the decoder alone, cut after the token's source position; the whole model over the whole
    sequence, with the same embeddings replaced at its decoder's input, gives the same probability and argmax."""
    from lvlm_interpret import GenerationOptions, generate_with_capture
    from lvlm_interpret.capture import replay_inputs, scoped_hook
    from tests.conftest import make_scene

    loaded = models(family)
    trace = generate_with_capture(loaded, [make_scene(120, 80)], "Describe the image.",
                                  GenerationOptions(max_new_tokens=4, min_new_tokens=4))
    token_index = 1
    scorer = _Scorer(loaded, trace, token_index)
    cells = trace.images[0].cell_positions.tolist()
    text = next(p for p in range(trace.prompt_length) if p not in trace.images[0].token_positions)
    masked = [cells[0], cells[len(cells) // 2], text]

    def replace(module, args, kwargs):
        embeds = kwargs["inputs_embeds"].clone()
        embeds[0, masked] = scorer.replacement[masked]
        images = [layout.cell_positions for layout in trace.images]
        return args, loaded.family.mask_image_side_inputs({**kwargs, "inputs_embeds": embeds}, masked, images)

    with torch.no_grad(), scoped_hook(loaded.family.language_model(loaded.model), replace, pre=True):
        logits = loaded.model(**replay_inputs(trace, "cpu")).logits[0, trace.source_position(token_index)].float()
    token = trace.answer_ids[token_index]
    probability, still_argmax = scorer(masked)
    assert probability == pytest.approx(float(torch.softmax(logits, -1)[token]), rel=1e-4, abs=1e-7)
    assert still_argmax == bool(logits.argmax() == token)
    assert scorer([])[0] == pytest.approx(math.exp(float(trace.answer_logprobs[token_index])), rel=1e-3)


def _linear_sem_samples(n_samples: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Samples of x0 -> x1 -> x2 -> x4 <- x3, x4 -> x6, x5 alone (a chain, a collider, an isolated node), with the
    graph's edges. The columns are in a causal order, as tokens are."""
    weights = {(0, 1): 0.8, (1, 2): 0.7, (2, 4): 0.6, (3, 4): 0.7, (4, 6): 0.5}
    rng = np.random.default_rng(0)
    samples = np.zeros((n_samples, 7))
    for node in range(7):
        samples[:, node] = rng.standard_normal(n_samples) + sum(
            weight * samples[:, parent] for (parent, child), weight in weights.items() if child == node)
    return samples, set(weights)


def test_independence_tests_and_pc_skeleton_match_causal_learn():
    """Cross-check against causal-learn's Fisher-z test and PC on the same samples. causal-learn takes samples
    only, so ours gets their correlation matrix (correlation_from_attention of the centred columns) and the same n.
    Compared: every p-value (all pairs, conditioning sets of 0-3 nodes) and the skeleton at depth 2. CLEANN's own
    search is token-ordered (sets from the later token's earlier neighbours, the reference's ordered ICD), which PC
    does not offer; it is compared where order cannot matter: here the token order is a causal order, so the
    later node's parents, all earlier, separate it from every earlier non-neighbour. The unordered configuration
    (ordered=False) is PC's adjacency search and is compared too."""
    n_samples = 2000
    samples, edges = _linear_sem_samples(n_samples)
    correlation = correlation_from_attention((samples - samples.mean(axis=0)).T)
    np.testing.assert_allclose(correlation, np.corrcoef(samples.T), atol=1e-12)
    fisher_z = CIT(samples, "fisherz")
    for i, j in itertools.combinations(range(7), 2):
        others = [k for k in range(7) if k not in (i, j)]
        for given in itertools.chain.from_iterable(itertools.combinations(others, size) for size in range(4)):
            ours = fisher_z_pvalue(partial_correlation(correlation, i, j, given), n_samples, len(given))
            assert ours == pytest.approx(fisher_z(i, j, list(given)), abs=1e-9), (i, j, given)
    for alpha in (0.01, 1e-5):
        graph = pc(samples, alpha, "fisherz", max_k=2, show_progress=False).G.graph
        theirs = {(i, j) for i, j in itertools.combinations(range(7), 2) if graph[i, j] != 0}
        assert theirs == edges
        assert learn_skeleton(correlation, n_samples, alpha, max_given=2, ordered=False) == theirs
        assert learn_skeleton(correlation, n_samples, alpha, max_given=2, ordered=True) == theirs
