"""Do single SAE features pick out the demo scenes' attributes? For each colour and shape, the feature whose
activation best separates the cells of objects with that attribute from the other objects' cells (AUROC, chosen
on one set of held-out scenes and measured on another). A cell belongs to an object when at least half of its
pixels do; background cells take no part."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from ..errors import UserInputError
from ..demo.scenes import COLOURS, HELD_OUT_SEED_START, SHAPES, draw_scene
from ..evaluation.metrics import cell_mask_overlap
from .features import LoadedSAE, encode_image

ATTRIBUTES = (*COLOURS, *SHAPES)


def object_cells(loaded, bundle: LoadedSAE, seeds, size: int = 192) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """(features [cells, n_features] of every object cell of the scenes, (colour, shape) of each cell)."""
    features, labels = [], []
    for seed in seeds:
        scene = draw_scene(seed, size)
        grid = encode_image(loaded, bundle, scene.image)
        for obj, mask in zip(scene.objects, scene.masks):
            cells = cell_mask_overlap(grid.site.layout, mask) >= 0.5
            features.append(grid.activations[cells])
            labels += [(obj.colour, obj.shape)] * int(cells.sum())
    return np.concatenate(features), labels


def auroc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUROC of every column of `scores` [n, m] for the bool labels [n] (ties count half)."""
    ranks = rankdata(scores, axis=0)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def attribute_auroc(loaded, bundle: LoadedSAE, n_select: int = 50, n_eval: int = 50, size: int = 192) -> dict:
    """Per attribute: the feature chosen on `n_select` held-out scenes and its AUROC there and on the next
    `n_eval` held-out scenes."""
    select_x, select_labels = object_cells(loaded, bundle, range(HELD_OUT_SEED_START,
                                                                 HELD_OUT_SEED_START + n_select), size)
    eval_x, eval_labels = object_cells(loaded, bundle, range(HELD_OUT_SEED_START + n_select,
                                                             HELD_OUT_SEED_START + n_select + n_eval), size)
    table = {}
    for attribute in ATTRIBUTES:
        slot = 0 if attribute in COLOURS else 1
        chosen_pos = np.array([label[slot] == attribute for label in select_labels])
        eval_pos = np.array([label[slot] == attribute for label in eval_labels])
        for positive, scenes in ((chosen_pos, n_select), (eval_pos, n_eval)):
            if positive.all() or not positive.any():
                raise UserInputError(f"{scenes} scenes hold no object cells {'other than' if positive.any() else 'of'}"
                                     f" {attribute}: use more scenes")
        scores = auroc(select_x, chosen_pos)
        feature = int(np.nanargmax(scores))
        table[attribute] = {"feature": feature, "auroc_select": float(scores[feature]),
                            "auroc": float(auroc(eval_x[:, [feature]], eval_pos)[0]),
                            "n_cells": int(eval_pos.sum()), "n_other_cells": int((~eval_pos).sum())}
    return {"hook_name": bundle.hook_name, "n_select_scenes": n_select, "n_eval_scenes": n_eval,
            "seed_start": HELD_OUT_SEED_START, "min_auroc": min(row["auroc"] for row in table.values()),
            "attributes": table}
