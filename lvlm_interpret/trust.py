"""Which map to believe for one answer token: each map's faithfulness (deletion / insertion AUC), the agreement
between every pair of maps, how much the token leans on the image at all, and a verdict in words.

`token_trust(loaded, trace, token_index, maps, image_share)` gives result.json's "trust" entry of one token:
{"deletion": {MAP: auc}, "insertion": {MAP: auc}, "agreement": {"MAP_A|MAP_B": {"spearman": r, "top_iou": x}},
"image_share": s, "p_original": p, "p_blurred": p, "verdict": "..."}. Deletion and insertion follow the
evaluation's definitions (lvlm_interpret.evaluation.faithfulness) at 10% steps.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.stats import spearmanr

from .evaluation.faithfulness import deletion_insertion_many
from .rendering import map_label, token_word
from .trace import Trace

TOP_SHARE = 0.10  # "top cells": the highest-scoring tenth of the grid
# below this share of relevancy on the image, the token is said to barely depend on it
LOW_IMAGE_SHARE = 0.2
# the maps whose disagreement the verdict reports: one per method family, the ones the page shows first
PRINCIPAL_MAPS = ("attention", "relevancy", "tam")
# deletion / insertion at 10% steps: 22 replays per map, so the panel answers in seconds on the demo model
CURVE_STEP = 0.1
# deletion / insertion are scaled by p(original) - p(blurred): below this gap they measure noise
MIN_BLUR_GAP = 0.05


def top_cells(grid_map: np.ndarray, share: float = TOP_SHARE) -> set[int]:
    """The flat indices of the map's highest `share` of cells (at least one)."""
    count = max(1, math.ceil(share * grid_map.size))
    return set(np.argsort(-grid_map.ravel(), kind="stable")[:count].tolist())


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Spearman correlation of two maps over the grid's cells, and the IoU of their top cells."""
    rho = spearmanr(a.ravel(), b.ravel()).statistic if np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")
    top_a, top_b = top_cells(a), top_cells(b)
    return {"spearman": None if math.isnan(rho) else round(float(rho), 4),
            "top_iou": round(len(top_a & top_b) / len(top_a | top_b), 4)}


def argmax_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Cells between the two maps' highest cells (Euclidean, on the grid)."""
    ra, ca = np.unravel_index(int(np.argmax(a)), a.shape)
    rb, cb = np.unravel_index(int(np.argmax(b)), b.shape)
    return float(math.hypot(int(ra) - int(rb), int(ca) - int(cb)))


def image_share(relevancy) -> float:
    """The relevancy row's mass on the image over its total (image and text, the token itself left out)."""
    on_image = float(sum(grid.sum() for grid in relevancy.maps))
    on_text = float(np.clip(relevancy.text_scores, 0, None).sum()) if relevancy.text_scores is not None else 0.0
    total = on_image + on_text
    return round(on_image / total, 4) if total > 0 else 0.0


def verdict(word: str, maps: dict[str, np.ndarray], deletion: dict, insertion: dict, share: float,
            blur_gap: float) -> str:
    """A sentence: whether the image matters, whether the principal maps agree, which map is most faithful."""
    parts = []
    if share < LOW_IMAGE_SHARE:
        parts.append(f"{word} barely depends on the image: {share:.0%} of its relevancy lies on it, so every map "
                     "here says little")
    principal = [name for name in PRINCIPAL_MAPS if name in maps and np.ptp(maps[name]) > 0]
    apart = [(a, b, argmax_distance(maps[a], maps[b])) for a, b in itertools.combinations(principal, 2)
             if len(top_cells(maps[a]) & top_cells(maps[b])) == 0]
    if apart:
        a, b, cells = max(apart, key=lambda pair: pair[2])
        parts.append(f"{a} and {b} point at different places ({cells:.0f} cells apart, no top cell in common)")
    elif len(principal) > 1:
        parts.append(f"{', '.join(principal)} share top cells")
    if abs(blur_gap) < MIN_BLUR_GAP:
        parts.append(f"blurring the image moves p({word}) by only {blur_gap:+.3f}, so deletion and insertion cannot "
                     "rank the maps")
    elif deletion:
        best = max(deletion, key=lambda name: insertion[name] - deletion[name])
        parts.append(f"the most faithful map is {best}, {map_label(best)} (deletion AUC {deletion[best]:.2f}, "
                     f"insertion {insertion[best]:.2f})")
    sentence = "; ".join(parts)
    return sentence[:1].upper() + sentence[1:] + "."


def token_trust(loaded, trace: Trace, token_index: int, maps: dict[str, np.ndarray], relevancy) -> dict:
    """The "trust" entry of one token: `maps` by name (the first image's grid of each), `relevancy` the token's
    relevancy Explanation (for the image share)."""
    curves = deletion_insertion_many(loaded, trace, token_index, maps, CURVE_STEP)
    deletion = {name: round(curve["deletion_auc"], 4) for name, curve in curves.items()}
    insertion = {name: round(curve["insertion_auc"], 4) for name, curve in curves.items()}
    share = image_share(relevancy)
    p_original, p_blurred = (next(iter(curves.values()))[key] for key in ("p_original", "p_blurred"))
    return {
        "deletion": deletion,
        "insertion": insertion,
        "agreement": {f"{a}|{b}": agreement(maps[a], maps[b]) for a, b in itertools.combinations(maps, 2)},
        "image_share": share,
        "p_original": round(p_original, 6),
        "p_blurred": round(p_blurred, 6),
        "verdict": verdict(token_word(trace.answer_texts[token_index]), maps, deletion, insertion, share,
                           p_original - p_blurred),
    }
