"""Using a trained SAE on a model: load it against the model, encode an image onto the map's grid, read a cell's
top features, edit features through the hook (scale or zero them, keeping the SAE's error term), and find the
top-activating cells of every feature over a set of images."""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..analysis.hooks import hooked
from ..capture import GenerationOptions, generate_with_capture
from ..errors import UserInputError
from .activations import DEFAULT_PROMPT, RowHook, Site, check_hook_name, image_activations, request_site
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


def feature_edit(sae: SparseAutoencoder, scales: dict[int, float]):
    """Rows -> rows with the features' activations multiplied by their scale (0 zeroes them): x + decode(f') -
    decode(f), so what the SAE does not reconstruct stays as it was."""
    for feature in scales:
        if not 0 <= int(feature) < sae.d_sae:
            raise UserInputError(f"feature {feature} is out of range: the SAE has {sae.d_sae} features")
    index = torch.tensor([int(f) for f in scales], dtype=torch.long)
    factor = torch.tensor([float(v) for v in scales.values()])

    def edit(rows: torch.Tensor) -> torch.Tensor:
        x = rows.float()
        features = sae.encode(x)
        edited = features.clone()
        edited[:, index] = features[:, index] * factor
        return x + sae.decode(edited) - sae.decode(features)
    return edit


@torch.no_grad()
def generate_with_feature_edits(loaded, bundle: LoadedSAE, image, prompt: str, scales: dict[int, float],
                                options: GenerationOptions | None = None):
    """The answer (a Trace) with `scales` applied at the SAE's hook on every token it reads."""
    options = options or GenerationOptions()
    _, site = request_site(loaded, bundle.hook_name, image, prompt)
    with hooked(loaded, [(bundle.hook_name, RowHook(site, feature_edit(bundle.sae, scales)))]):
        return generate_with_capture(loaded, [image], prompt, options)


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
