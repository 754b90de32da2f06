"""Two requests side by side: request B is request A with the prompt, the image and / or the model changed.

`compare_requests(backend, request_a, request_b, methods)` aligns the two answers' tokens by their text, in order
(difflib's sequence alignment, so a repeated word pairs with its counterpart in the same place), and for each
aligned pair and each map of the chosen methods says how alike the two maps are: Spearman correlation over the
cells, IoU of the top 10% cells (lvlm_interpret.trust's agreement) and the distance in cells between the two
maps' highest cells. It also gives every answer token's image share of relevancy, on both sides. It goes through
the ExplainBackend interface only, so it runs in process (ExplainService) and over HTTP (RemoteService) alike.

Where the two grids differ (two models, or images of another shape), B's maps are resampled bilinearly onto A's
grid before any of the three numbers is computed (both grids cover their image's box, so a cell of A's grid and
the resampled cell sit at the same relative place) and the shift is counted in A's cells; the result says so in
"grids_match": false.
"""

from __future__ import annotations

import difflib

import numpy as np
from PIL import Image

from .backend import ExplainBackend, TraceView
from .capture import GenerationOptions
from .errors import UserInputError
from .export import answer_record, image_info
from .methods import get_method
from .methods.base import check_method_options
from .trust import agreement, argmax_distance, image_share

DEFAULT_METHODS = ("attention", "relevancy", "tam")


def token_key(text: str) -> str:
    """What two answer tokens must share to be aligned: their text, trimmed and lower-cased."""
    return text.strip().lower()


def align_tokens(texts_a: list[str], texts_b: list[str]) -> list[tuple[int, int]]:
    """(index in A, index in B) of the tokens a sequence alignment of the two answers matches, in order; tokens that
    are only whitespace never pair."""
    kept_a = [i for i, text in enumerate(texts_a) if token_key(text)]
    kept_b = [i for i, text in enumerate(texts_b) if token_key(text)]
    matcher = difflib.SequenceMatcher(None, [token_key(texts_a[i]) for i in kept_a],
                                      [token_key(texts_b[i]) for i in kept_b], autojunk=False)
    return [(kept_a[block.a + k], kept_b[block.b + k]) for block in matcher.get_matching_blocks()
            for k in range(block.size)]


def on_grid(grid_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The map resampled bilinearly onto a grid of `shape` (rows, cols) covering the same box."""
    if grid_map.shape == tuple(shape):
        return grid_map
    resized = Image.fromarray(np.asarray(grid_map, dtype=np.float32), mode="F").resize(
        (shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def map_similarity(map_a: np.ndarray, map_b: np.ndarray) -> dict:
    """{"spearman", "top_iou", "argmax_shift_cells"} of two maps, B resampled onto A's grid where they differ."""
    map_b = on_grid(map_b, map_a.shape)
    return {**agreement(map_a, map_b), "argmax_shift_cells": round(argmax_distance(map_a, map_b), 4)}


def request_summary(trace: TraceView) -> dict:
    """A side of compare.json: result.json's answer record and image entry."""
    return {**answer_record(trace), "image": image_info(trace)}


def check_methods(methods) -> list[str]:
    names = list(dict.fromkeys(methods))
    if not names:
        raise UserInputError("no methods to compare: name at least one, e.g. attention,relevancy,tam")
    for name in names:
        get_method(name)
    return names


def token_maps(backend: ExplainBackend, request_id: str, token_index: int, methods, options: dict | None = None
               ) -> dict[str, np.ndarray]:
    """Every map of the methods for one token, by map name (the first image's grid)."""
    return {name: grids[0] for method in methods
            for name, grids in backend.explain(request_id, method, token_index,
                                               **(options or {}).get(method, {})).all_maps().items()}


def compare_requests(backend: ExplainBackend, request_a: str, request_b: str, methods=DEFAULT_METHODS,
                     options: dict | None = None) -> dict:
    """compare.json of two generated requests: {"a": summary, "b": summary, "methods", "grids_match",
    "pairs": [{"a": TOKEN_INDEX, "b": TOKEN_INDEX, "text": WORD, "similarity": {MAP: {"spearman", "top_iou",
    "argmax_shift_cells"}}}], "image_share": {"a": [...], "b": [...]}}; maps are the first image's, `options` the
    methods' ({method: {name: value}})."""
    trace_a, trace_b = backend.trace(request_a), backend.trace(request_b)  # an unknown id first: 404 over HTTP
    methods = check_methods(methods)
    options = check_method_options(options or {})

    def shares(request_id: str, trace: TraceView) -> list[float]:
        return [image_share(backend.explain(request_id, "relevancy", t, **options.get("relevancy", {})))
                for t in range(trace.n_answer)]

    pairs = []
    for index_a, index_b in align_tokens(trace_a.answer_texts, trace_b.answer_texts):
        maps_a, maps_b = (token_maps(backend, request_id, index, methods, options)
                          for request_id, index in ((request_a, index_a), (request_b, index_b)))
        pairs.append({"a": index_a, "b": index_b, "text": trace_a.answer_texts[index_a].strip(),
                      "similarity": {name: map_similarity(maps_a[name], maps_b[name]) for name in maps_a}})
    grid_a, grid_b = ((layout.rows, layout.cols) for layout in (trace_a.images[0], trace_b.images[0]))
    return {"a": request_summary(trace_a), "b": request_summary(trace_b), "methods": methods,
            "grids_match": grid_a == grid_b, "pairs": pairs,
            "image_share": {"a": shares(request_a, trace_a), "b": shares(request_b, trace_b)}}


def generate_pair(backend: ExplainBackend, image: Image.Image, prompt: str, model: str | None = None,
                  image_b: Image.Image | None = None, prompt_b: str | None = None, model_b: str | None = None,
                  options: GenerationOptions | None = None) -> tuple[str, str]:
    """Generate request A and request B (A with the fields given for B changed); returns their ids."""
    if image_b is None and prompt_b is None and model_b is None:
        raise UserInputError("request B is the same as request A: change its image, prompt or model")
    for name, text in (("prompt", prompt), ("prompt of request B", prompt_b)):
        if text is not None and not text.strip():
            raise UserInputError(f"the {name} is empty: give a question about the image")
    request_a, _ = backend.generate([image], prompt, model, options)
    request_b, _ = backend.generate([image if image_b is None else image_b], prompt if prompt_b is None else prompt_b,
                                    model if model_b is None else model_b, options)
    return request_a, request_b
