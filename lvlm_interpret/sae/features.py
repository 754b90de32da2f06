"""Using a trained SAE on a model: load it against the model, encode an image onto the map's grid, read a cell's
top features, edit features through the hook (scale or zero them, keeping the SAE's error term), and find the
top-activating cells of every feature over a set of images."""

from __future__ import annotations

import contextlib
import heapq
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..analysis.hooks import hooked
from ..capture import GenerationOptions, build_inputs, generate_with_capture
from ..errors import UserInputError
from ..families.base import ImageLayout
from .activations import DEFAULT_PROMPT, Site, check_hook_name, image_activations, image_site
from .format import load_sae, resolve_sae_path
from .model import SparseAutoencoder

TOP_CELLS_FILE = "top_cells.npz"


@dataclass
class LoadedSAE:
    sae: SparseAutoencoder
    config: dict
    path: Path

    @property
    def hook_name(self) -> str:
        return self.config["metadata"]["hook_name"]

    @property
    def model_name(self) -> str | None:
        return self.config["metadata"].get("model_name")

    @property
    def n_features(self) -> int:
        return self.sae.d_sae


def load_sae_for(loaded, name_or_path) -> LoadedSAE:
    """Load an SAE and check that it reads a hook point of `loaded` (its width is checked on the first image)."""
    sae, config = load_sae(name_or_path)
    bundle = LoadedSAE(sae, config, resolve_sae_path(name_or_path))
    if not bundle.hook_name:
        raise UserInputError(f"--sae {name_or_path}: cfg.json names no hook_name (metadata.hook_name)")
    check_hook_name(loaded, bundle.hook_name)
    return bundle


@dataclass
class FeatureGrid:
    """An image's SAE features on the map's grid."""

    activations: np.ndarray  # float32 [rows, cols, n_features]
    site: Site
    hook_name: str

    def top_features(self, row: int, col: int, k: int = 10) -> list[tuple[int, float]]:
        """(feature, activation) of the cell's k strongest active features, strongest first."""
        values = self.activations[row, col]
        order = np.argsort(-values, kind="stable")[:k]
        return [(int(i), float(values[i])) for i in order if values[i] > 0]

    def feature_map(self, feature: int) -> np.ndarray:
        if not 0 <= feature < self.activations.shape[-1]:
            raise UserInputError(f"feature {feature} is out of range: the SAE has {self.activations.shape[-1]} "
                                 "features")
        return self.activations[..., feature].astype(np.float32)

    def to_json(self, k: int = 10) -> dict:
        rows, cols, n = self.activations.shape
        return {"hook_name": self.hook_name, "grid": [rows, cols], "n_features": n,
                "cells": [[[{"feature": f, "activation": round(v, 6)} for f, v in self.top_features(r, c, k)]
                           for c in range(cols)] for r in range(rows)]}


def _checked_rows(bundle: LoadedSAE, rows: torch.Tensor) -> torch.Tensor:
    if rows.shape[-1] != bundle.sae.d_in:
        raise UserInputError(f"the SAE reads {bundle.sae.d_in}-wide activations but {bundle.hook_name} of this model "
                             f"is {rows.shape[-1]} wide: use an SAE trained on this model")
    return rows


@torch.no_grad()
def encode_image(loaded, bundle: LoadedSAE, image, prompt: str = DEFAULT_PROMPT) -> FeatureGrid:
    rows, site = image_activations(loaded, bundle.hook_name, image, prompt)
    features = bundle.sae.encode(_checked_rows(bundle, rows))
    return FeatureGrid(site.cells(features).numpy().astype(np.float32), site, bundle.hook_name)


MAX_SCALE = 1000.0  # for scales and clamped values alike


def _feature_numbers(name: str, mapping, example: str) -> dict[int, float]:
    try:
        numbers = {int(feature): float(value) for feature, value in (mapping or {}).items()}
    except (TypeError, ValueError, AttributeError):
        raise UserInputError(f"{name} map feature numbers to numbers, e.g. {example}") from None
    if any(not np.isfinite(v) or abs(v) > MAX_SCALE for v in numbers.values()):
        raise UserInputError(f"{name}: each must be a finite number between -{MAX_SCALE:g} and {MAX_SCALE:g}")
    return numbers


@dataclass(frozen=True)
class FeatureEdit:
    """Features of an SAE edited while a request is answered, and while its answer is explained again: `scales`
    multiply features' activations (0 zeroes one), `values` clamp features to an activation (switching on one that
    is silent there); `sae` names the SAE (a service's name, or a folder); `cells` restricts the edit to those
    (row, col) cells of the first image's grid (None: every cell). Made by `FeatureEdit.make`, which checks input."""

    sae: str
    scales: tuple[tuple[int, float], ...] = ()
    values: tuple[tuple[int, float], ...] = ()
    cells: tuple[tuple[int, int], ...] | None = None

    @classmethod
    def make(cls, sae, scales: dict | None = None, values: dict | None = None, cells=None) -> "FeatureEdit":
        scales = _feature_numbers("scales", scales, '{"12": 0, "40": 3}')
        values = _feature_numbers("values", values, '{"40": 30}')
        if not scales and not values:
            raise UserInputError('name at least one feature to scale ({"12": 0} zeroes feature 12) or to clamp '
                                 '(values {"40": 30})')
        both = sorted(set(scales) & set(values))
        if both:
            raise UserInputError(f"feature {both[0]} is both scaled and clamped: give it one of the two")
        if cells is not None:
            try:
                cells = tuple(sorted({(int(row), int(col)) for row, col in cells}))
            except (TypeError, ValueError):
                raise UserInputError("cells are [row, col] pairs of the map's grid, e.g. [[3, 4], [3, 5]]") from None
            if not cells:
                raise UserInputError("cells is empty: name at least one [row, col] cell, or leave cells out to edit "
                                     "every cell")
        return cls(str(sae), tuple(sorted(scales.items())), tuple(sorted(values.items())), cells)

    def to_json(self) -> dict:
        return {"sae": self.sae, "scales": {str(f): v for f, v in self.scales},
                "values": {str(f): v for f, v in self.values},
                "cells": None if self.cells is None else [list(cell) for cell in self.cells]}

    @classmethod
    def from_json(cls, value: dict) -> "FeatureEdit":
        return cls.make(value["sae"], value.get("scales"), value.get("values"), value.get("cells"))


def feature_edit(sae: SparseAutoencoder, scales: dict[int, float], values: dict[int, float] | None = None):
    """Rows -> rows with the features' activations multiplied by their scale (0 zeroes them) and clamped to
    `values`: x + decode(f') - decode(f), so what the SAE does not reconstruct stays as it was."""
    values = values or {}
    for feature in [*scales, *values]:
        if not 0 <= int(feature) < sae.d_sae:
            raise UserInputError(f"feature {feature} is out of range: the SAE has {sae.d_sae} features")
    scaled, factor = torch.tensor([int(f) for f in scales], dtype=torch.long), torch.tensor(
        [float(v) for v in scales.values()])
    clamped, value = torch.tensor([int(f) for f in values], dtype=torch.long), torch.tensor(
        [float(v) for v in values.values()])

    def edit(rows: torch.Tensor) -> torch.Tensor:
        x = rows.float()
        features = sae.encode(x)
        edited = features.clone()
        edited[:, scaled] = features[:, scaled] * factor
        edited[:, clamped] = value.expand(len(x), -1)
        return x + sae.decode(edited) - sae.decode(features)
    return edit


def edited_rows(site: Site, cells: tuple[tuple[int, int], ...] | None) -> np.ndarray:
    """The site's rows that make up `cells` (None: all of them), ascending."""
    if cells is None:
        return site.rows
    rows, cols = site.grid
    outside = [cell for cell in cells if not (0 <= cell[0] < rows and 0 <= cell[1] < cols)]
    if outside:
        raise UserInputError(f"cell {list(outside[0])} is outside the {rows} x {cols} grid of the image")
    index = np.array([row * cols + col for row, col in cells])
    return site.rows[np.unique(site.cell_rows[index][site.cell_weights[index] > 0])]


def edit_hook(site: Site, edit, cells: tuple[tuple[int, int], ...] | None = None):
    """A hook function that rewrites the rows of `cells` in every call that holds them: the prompt's forward of
    `generate` and every later replay of the request (a method's forward, batched or not); calls that end before
    them (the one-token steps of `generate`) pass untouched. Rows are counted along the token axis (the LM's
    [batch, seq, d], LLaVA's tower [images, seq, d], Qwen2-VL's tower [tokens, d])."""
    rows = torch.as_tensor(edited_rows(site, cells))
    last = int(rows.max())

    def hook(value: torch.Tensor, name: str):
        if value.shape[-2] <= last:
            return None
        index = rows.to(value.device)
        picked = value[..., index, :]
        edited = value.clone()
        edited[..., index, :] = edit(picked.reshape(-1, value.shape[-1])).reshape(picked.shape).to(value.dtype)
        return edited
    return hook


@contextlib.contextmanager
def editing(loaded, bundle: LoadedSAE, edit: FeatureEdit, layouts: list[ImageLayout]):
    """While active, the model's forwards in this context run with `edit` at the SAE's hook on the first image of a
    request laid out as `layouts` (`capture.generate_with_capture`, or a method replaying its trace)."""
    if bundle.hook_name.startswith("vision.") and len(layouts) > 1:
        raise UserInputError(f"an SAE on the vision tower ({bundle.hook_name}) edits requests of one image: this "
                             f"one has {len(layouts)}")
    site = image_site(loaded, bundle.hook_name, layouts)
    rewrite = feature_edit(bundle.sae, dict(edit.scales), dict(edit.values))
    with hooked(loaded, [(bundle.hook_name, edit_hook(site, rewrite, edit.cells))]):
        yield


def request_layouts(loaded, images: list, prompt: str) -> list[ImageLayout]:
    inputs = build_inputs(loaded, images, prompt)
    return loaded.family.image_layouts(loaded.model, loaded.processor, inputs, images)


@torch.no_grad()
def generate_edited(loaded, bundle: LoadedSAE, images: list, prompt: str, edit: FeatureEdit,
                    options: GenerationOptions | None = None):
    """The answer (a Trace, `feature_edit` recording `edit`) generated and captured with `edit` applied: its
    attention and TAM maps are those of the edited model; methods that re-run the model must run under
    `editing` too (the service does)."""
    with editing(loaded, bundle, edit, request_layouts(loaded, images, prompt)):
        trace = generate_with_capture(loaded, images, prompt, options)
    trace.feature_edit = {**edit.to_json(), "hook_name": bundle.hook_name}
    return trace


def generate_with_feature_edits(loaded, bundle: LoadedSAE, image, prompt: str, scales: dict[int, float],
                                options: GenerationOptions | None = None, values: dict[int, float] | None = None,
                                cells=None):
    """The answer (a Trace) with `scales` and `values` (clamped activations) applied at the SAE's hook on the
    image's tokens (of `cells` only, if given: [(row, col), ...] of the map's grid)."""
    return generate_edited(loaded, bundle, [image], prompt, FeatureEdit.make(bundle.path, scales, values, cells),
                           options)


@torch.no_grad()
def top_cells(loaded, bundle: LoadedSAE, images: Iterable, keys: list, per_feature: int = 16,
              prompt: str = DEFAULT_PROMPT, progress=None) -> dict:
    """The `per_feature` cells with the highest activation of every feature over `images` (running heaps), as
    arrays [n_features, per_feature]: `image` (index into `keys`), `row`, `col`, `value` (0 where fewer fired)."""
    heaps: list[list] = [[] for _ in range(bundle.n_features)]
    for index, image in enumerate(images):
        grid = encode_image(loaded, bundle, image, prompt).activations
        rows, cols, _ = grid.shape
        flat = grid.reshape(rows * cols, -1)
        best = np.argsort(-flat, axis=0)[:per_feature]  # [per_feature, features]
        for feature in np.nonzero(flat.max(0) > 0)[0]:
            heap = heaps[feature]
            for cell in best[:, feature]:
                value = float(flat[cell, feature])
                if value <= 0:
                    break
                entry = (value, index, *divmod(int(cell), cols))
                if len(heap) < per_feature:
                    heapq.heappush(heap, entry)
                elif entry > heap[0]:
                    heapq.heapreplace(heap, entry)
        if progress:
            progress(index + 1)
    shape = (bundle.n_features, per_feature)
    result = {"image": np.full(shape, -1, np.int32), "row": np.zeros(shape, np.int16), "col": np.zeros(shape, np.int16),
              "value": np.zeros(shape, np.float32)}
    for feature, heap in enumerate(heaps):
        for slot, (value, index, row, col) in enumerate(sorted(heap, reverse=True)):
            result["image"][feature, slot], result["row"][feature, slot], result["col"][feature, slot] = index, row, col
            result["value"][feature, slot] = value
    result["keys"] = np.array([json.dumps(key) for key in keys])
    return result


def save_top_cells(folder, cells: dict) -> None:
    np.savez_compressed(Path(folder) / TOP_CELLS_FILE, **cells)


def load_top_cells(bundle: LoadedSAE) -> dict | None:
    path = bundle.path / TOP_CELLS_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:
        cells = {name: data[name] for name in data.files}
    cells["keys"] = [json.loads(str(key)) for key in cells["keys"]]
    return cells
