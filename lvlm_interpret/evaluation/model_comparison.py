"""Which model looks where: statistics of two models' maps over the same dataset, and a paired test per statistic.

For every sample each model answers with capture; per answer token (whitespace tokens left out) its attention map
(every layer, heads averaged) and its relevancy map over the first image's cells give:
- `attention_entropy`, `relevancy_entropy`: the map's entropy as a distribution over the image cells, divided by
  log(cells): 1 spreads evenly over the image, 0 sits on one cell (comparable across grids);
- `attention_top_spread`, `relevancy_top_spread`: the mean distance of the top 10% cells to their centroid, in
  fractions of the image box's side (cell centres at (row + 0.5) / rows, (col + 0.5) / cols);
- `image_share`: the relevancy row's share on the image (lvlm_interpret.trust.image_share);
averaged over the sample's tokens; and, where the dataset has masks, `pointing_attention`, `pointing_relevancy`:
the share of the answer's object words whose map peaks on their object (the benchmark's pointing game,
lvlm_interpret.evaluation.benchmark). Each statistic is compared over the samples where both models have it with
scipy's Wilcoxon signed-rank test (two-sided); identical values everywhere give p = 1.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy.stats import wilcoxon

from ..capture import GenerationOptions, generate_with_capture
from ..methods import get_method
from ..trust import image_share, top_cells
from .benchmark import Sample, evaluate_sample

STATISTICS = ("attention_entropy", "relevancy_entropy", "attention_top_spread", "relevancy_top_spread",
              "image_share", "pointing_attention", "pointing_relevancy")
POINTING_MAPS = {"pointing_attention": "attention", "pointing_relevancy": "relevancy"}


def normalised_entropy(grid_map: np.ndarray) -> float | None:
    """Entropy of the map as a distribution over its cells / log(cells); None for an all-zero map."""
    total = float(grid_map.sum())
    if total <= 0 or grid_map.size < 2:
        return None
    p = grid_map.ravel() / total
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(grid_map.size))


def top_spread(grid_map: np.ndarray) -> float:
    """Mean distance of the top cells to their centroid, in fractions of the grid's side."""
    rows, cols = grid_map.shape
    cells = np.array([divmod(index, cols) for index in sorted(top_cells(grid_map))], dtype=np.float64)
    centres = (cells + 0.5) / np.array([rows, cols])
    return float(np.linalg.norm(centres - centres.mean(axis=0), axis=1).mean())


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def sample_statistics(loaded, sample: Sample, max_new_tokens: int = 24) -> dict:
    """{"answer", "correct", STATISTIC: value or None} of one model on one sample."""
    trace = generate_with_capture(loaded, [sample.image], sample.prompt,
                                  GenerationOptions(max_new_tokens=max_new_tokens))
    tokens = [t for t in range(trace.n_answer) if trace.answer_texts[t].strip()]
    values = {}
    if tokens:
        maps = {name: get_method(name).explain_many(trace, tokens, model=loaded) for name in ("attention", "relevancy")}
        for name, explained in maps.items():
            values[f"{name}_entropy"] = _mean(normalised_entropy(e.maps[0]) for e in explained)
            values[f"{name}_top_spread"] = _mean(top_spread(e.maps[0]) for e in explained)
        values["image_share"] = _mean(image_share(e) for e in maps["relevancy"])
    scored = evaluate_sample(loaded, sample, list(POINTING_MAPS.values()), max_new_tokens=max_new_tokens)
    for statistic, map_name in POINTING_MAPS.items():
        values[statistic] = _mean(value for name, metric, value in scored["records"]
                                  if name == map_name and metric == "pointing_game")
    return {"answer": trace.answer, "correct": scored["correct"],
            **{statistic: values.get(statistic) for statistic in STATISTICS}}


def paired_test(values_a: list, values_b: list) -> dict:
    """Each model's mean over the samples it has a value for, and over the samples both have one the median
    difference (B - A) and the two-sided Wilcoxon signed-rank test."""
    own_a, own_b = ([v for v in values if v is not None] for values in (values_a, values_b))
    pairs = [(a, b) for a, b in zip(values_a, values_b) if a is not None and b is not None]
    row = {"mean_a": round(float(np.mean(own_a)), 4) if own_a else None, "n_a": len(own_a),
           "mean_b": round(float(np.mean(own_b)), 4) if own_b else None, "n_b": len(own_b), "n_pairs": len(pairs),
           "median_difference": None, "wilcoxon": None, "p_value": None}
    if not pairs:
        return row
    a, b = np.array(pairs).T
    differences = b - a
    row["median_difference"] = round(float(np.median(differences)), 4)
    if np.all(differences == 0):
        row["p_value"] = 1.0
    else:
        test = wilcoxon(a, b)
        row["wilcoxon"], row["p_value"] = float(test.statistic), round(float(test.pvalue), 6)
    return row


def compare_models(loaded_a, loaded_b, sample_at: Callable[[int], Sample], n: int, max_new_tokens: int = 24,
                   progress: bool = True) -> dict:
    """Both models on samples 0..n-1: {"samples": [{"key", "a": {...}, "b": {...}}], "statistics": {STATISTIC:
    paired_test}, "answer_accuracy": {"a", "b"}}."""
    from tqdm.auto import tqdm

    samples = []
    for index in tqdm(range(n), desc="samples", unit="sample", disable=not progress):
        sample = sample_at(index)
        samples.append({"key": sample.key, "a": sample_statistics(loaded_a, sample, max_new_tokens),
                        "b": sample_statistics(loaded_b, sample, max_new_tokens)})
    statistics = {statistic: paired_test([s["a"][statistic] for s in samples], [s["b"][statistic] for s in samples])
                  for statistic in STATISTICS}
    accuracy = {}
    for side in ("a", "b"):
        known = [s[side]["correct"] for s in samples if s[side]["correct"] is not None]
        accuracy[side] = float(np.mean(known)) if known else None
    return {"statistics": statistics, "answer_accuracy": accuracy, "samples": samples}


def markdown_table(result: dict, name_a: str, name_b: str) -> str:
    """The statistics as a markdown table: both models' means, the median difference, n and Wilcoxon's p."""
    def cell(value):
        return "-" if value is None else f"{value:.4g}"

    lines = [f"| statistic | {name_a} (A): mean (n) | {name_b} (B): mean (n) | median B - A | pairs | Wilcoxon p |",
             "|---|---|---|---|---|---|"]
    for statistic, row in result["statistics"].items():
        lines.append(f"| {statistic} | {cell(row['mean_a'])} ({row['n_a']}) | {cell(row['mean_b'])} ({row['n_b']}) | "
                     f"{cell(row['median_difference'])} | {row['n_pairs']} | {cell(row['p_value'])} |")
    return "\n".join(lines) + "\n"


def figure(result: dict, name_a: str, name_b: str):
    """A Plotly figure: one panel per statistic, each sample's value for A and B joined by a line."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    statistics = list(result["statistics"])
    columns = 4
    rows = math.ceil(len(statistics) / columns)
    titles = [f"{s} (p={result['statistics'][s]['p_value']})" for s in statistics]
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=titles)
    for k, statistic in enumerate(statistics):
        row, col = k // columns + 1, k % columns + 1
        for s in result["samples"]:
            a, b = s["a"][statistic], s["b"][statistic]
            if a is not None and b is not None:
                fig.add_trace(go.Scatter(x=[f"A {name_a}", f"B {name_b}"], y=[a, b], mode="lines+markers",
                                         line={"color": "rgba(80,80,160,0.35)"}, marker={"size": 5},
                                         name=s["key"], showlegend=False, hovertext=s["key"]), row=row, col=col)
    fig.update_layout(title=f"Which model looks where: {name_a} (A) vs {name_b} (B), {len(result['samples'])} samples",
                      height=320 * rows, width=1200)
    return fig
