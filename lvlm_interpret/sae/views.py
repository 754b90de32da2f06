"""What a front end shows of an SAE on a request: each cell's top features, one feature's map on the image with
its top-activating patches over the SAE's cached images, and the answer and maps with features edited."""

from __future__ import annotations

import functools
import json

import numpy as np
from PIL import Image, ImageDraw

from ..capture import build_inputs
from ..errors import UserInputError
from ..images import load_image
from ..rendering import png_data_uri
from .features import FeatureEdit, FeatureGrid, LoadedSAE, encode_image, load_top_cells

PATCH_PX = 72


def request_features(loaded, bundle: LoadedSAE, trace) -> FeatureGrid:
    """The features of the request's first image, asked the request's prompt."""
    return encode_image(loaded, bundle, trace.image(0), trace.prompt)


def features_json(grid: FeatureGrid, k: int = 10) -> dict:
    if not 1 <= k <= 100:
        raise UserInputError(f"k must be between 1 and 100, got {k}")
    return grid.to_json(k)


@functools.lru_cache(maxsize=256)
def _key_image(key: str) -> Image.Image:
    from ..demo.scenes import draw_scene

    value = json.loads(key)
    return draw_scene(value["seed"], value["size"]).image if isinstance(value, dict) else load_image(value)


def cell_patch(loaded, image: Image.Image, row: int, col: int, px: int = PATCH_PX) -> Image.Image:
    """The cell with one cell of context around it, the cell outlined, `px` pixels wide."""
    inputs = build_inputs(loaded, [image], "Describe the image.")
    layout = loaded.family.image_layouts(loaded.model, loaded.processor, inputs, [image])[0]
    x0, y0, x1, y1 = layout.box
    width, height = (x1 - x0) / layout.cols, (y1 - y0) / layout.rows
    left, top = x0 + (col - 1) * width, y0 + (row - 1) * height
    crop = image.crop((round(left), round(top), round(left + 3 * width), round(top + 3 * height)))
    crop = crop.resize((px, px), Image.Resampling.NEAREST)
    ImageDraw.Draw(crop).rectangle((px / 3, px / 3, 2 * px / 3, 2 * px / 3), outline=(255, 0, 255), width=2)
    return crop


def feature_json(loaded, bundle: LoadedSAE, grid: FeatureGrid, feature: int, top: int = 8) -> dict:
    """The feature's map on this image and its `top` strongest cells over the SAE's cached images (a PNG data URI
    of each, with its image's key and its activation)."""
    if not 0 <= top <= 64:
        raise UserInputError(f"top must be between 0 and 64, got {top}")
    grid_map = grid.feature_map(feature)
    cells = load_top_cells(bundle)
    top_cells = []
    if cells is not None:
        for slot in range(min(top, cells["value"].shape[1])):
            index = int(cells["image"][feature, slot])
            if index < 0:
                break
            key = cells["keys"][index]
            row, col = int(cells["row"][feature, slot]), int(cells["col"][feature, slot])
            patch = cell_patch(loaded, _key_image(json.dumps(key)), row, col)
            top_cells.append({"image": key, "row": row, "col": col, "value": float(cells["value"][feature, slot]),
                              "patch": png_data_uri(patch)})
    return {"feature": feature, "hook_name": grid.hook_name, "map": grid_map.tolist(),
            "max": float(grid_map.max()), "top_cells": top_cells, "cached_images": None if cells is None
            else len(cells["keys"])}


STEER_MAP_METHODS = ("attention", "tam")  # captured during generation: the edited model's own maps, no re-run


def steer_json(edit: FeatureEdit, trace, steered_id: str, steered, token_index: int, steered_token: int,
               maps: dict) -> dict:
    """The answer generated with `edit` (the request `steered_id`) next to the original, and `maps` ({method:
    {"before": grid, "after": grid}}) of answer token `token_index` before and `steered_token` after."""
    return {**edit.to_json(), "hook_name": steered.feature_edit["hook_name"], "request_id": steered_id,
            "answer_before": trace.answer, "answer": steered.answer, "answer_changed": steered.answer != trace.answer,
            "token_index": token_index, "token_before": trace.answer_texts[token_index],
            "steered_token_index": steered_token, "token": steered.answer_texts[steered_token],
            "maps": {method: {when: np.asarray(grid, dtype=np.float32).tolist() for when, grid in pair.items()}
                     for method, pair in maps.items()}}
