"""The whole of `sae train`: cache a hook's activations over a data set, train, measure, save in SAELens' format.

The folder gets cfg.json and sae_weights.safetensors (SAELens format), metrics.json (reconstruction on held-out
images and the spliced-in effect on held-out questions), top_cells.npz (each feature's top-activating cells over
the training images, for the feature browser) and, while training, activations.safetensors (the cache, removed at
the end) and checkpoint.pt (kept: a rerun with the same settings resumes there)."""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..analysis.ablation import image_files
from ..errors import UserInputError
from ..images import load_image
from .activations import DEFAULT_PROMPT, cache_activations, check_hook_name
from .features import LoadedSAE, save_top_cells, top_cells
from .format import METRICS_FILE, load_sae, save_sae
from .metrics import reconstruction_metrics, spliced_effect
from .train import TrainConfig, split_by_image, train_sae

CACHE_FILE = "activations.safetensors"
DATASETS = ("shapes", "images")


@dataclass
class DataSpec:
    """Training images: `shapes` (demo scenes of seeds 0..n-1, drawn at `size`) or every image of `images_dir`."""

    dataset: str = "shapes"
    n: int = 1000
    images_dir: str | None = None
    size: int = 192
    prompt: str = DEFAULT_PROMPT
    eval_scenes: int = 20  # held-out demo scenes whose questions measure the spliced-in effect (shapes)

    def check(self) -> None:
        if self.dataset not in DATASETS:
            raise UserInputError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.dataset == "images" and not self.images_dir:
            raise UserInputError("give --dataset shapes --n N or --images DIR")
        if self.dataset == "shapes" and self.n < 2:
            raise UserInputError(f"--n must be at least 2 scenes (one is held out), got {self.n}")
        if self.eval_scenes < 0:
            raise UserInputError(f"--eval-scenes must be 0 or more, got {self.eval_scenes}")
        if not self.prompt.strip():
            raise UserInputError("--prompt is empty: give the question asked with every image")

    def images(self) -> tuple[list, list]:
        """(image loaders or images, keys naming each image for the feature browser)."""
        if self.dataset == "images":
            files = image_files(self.images_dir)
            return [lambda path=path: load_image(path) for path in files], [str(path) for path in files]
        from ..demo.scenes import draw_scene

        return [lambda seed=seed: draw_scene(seed, self.size).image for seed in range(self.n)], \
            [{"seed": seed, "size": self.size} for seed in range(self.n)]

    def questions(self, loaders: list, held_out: list[int]) -> list[tuple]:
        """(image, prompt, expected answer or None) of the held-out data."""
        if self.dataset == "images":
            return [(loaders[i](), self.prompt, None) for i in held_out]
        from ..demo.scenes import HELD_OUT_SEED_START, draw_scene, sample_questions

        rng, questions = random.Random(0), []
        for i in range(self.eval_scenes):
            scene = draw_scene(HELD_OUT_SEED_START + i, self.size)
            questions += [(scene.image, prompt, answer) for prompt, answer in sample_questions(scene, rng, 2)]
        return questions


def _progress(total: int, desc: str, enabled: bool) -> tuple[Callable[[int], None], tqdm]:
    bar = tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, file=sys.stderr)
    return (lambda done: bar.update(done - bar.n)), bar


def cached_activations(loaded, hook_name: str, data: DataSpec, loaders: list, folder: Path,
                       progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The activations of the training images, read from the folder's cache when it holds this request's."""
    key = {"model": loaded.name, "hook": hook_name, "data": json.dumps(asdict(data), sort_keys=True)}
    path = folder / CACHE_FILE
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            if handle.metadata() == key:
                tensors = load_file(str(path))
                return tensors["activations"], tensors["owners"]
    update, bar = _progress(len(loaders), "activations", progress)
    activations, owners = cache_activations(loaded, hook_name, (load() for load in loaders), data.prompt, update)
    bar.close()
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(CACHE_FILE + ".partial")
    save_file({"activations": activations, "owners": owners}, str(partial), metadata=key)
    partial.replace(path)
    return activations, owners


def train_on_model(loaded, hook_name: str, config: TrainConfig, data: DataSpec, out, progress: bool = True,
                   command: str = "") -> dict:
    """Train an SAE on `hook_name` of `loaded` and write the folder `out`; returns metrics.json's content."""
    check_hook_name(loaded, hook_name)
    config.check()
    data.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    started = time.time()
    loaders, keys = data.images()
    activations, owners = cached_activations(loaded, hook_name, data, loaders, out, progress)
    result = train_sae(activations, owners, config, out,
                       data_key={"model": loaded.name, "hook": hook_name, "tokens": int(activations.shape[0])},
                       progress=progress)
    _, held_mask = split_by_image(owners)
    held_images = sorted(set(owners[held_mask].tolist()))
    metrics = {"model_name": loaded.name, "hook_name": hook_name, "architecture": result.sae.architecture,
               "d_in": result.sae.d_in, "d_sae": result.sae.d_sae, "k": config.k if config.architecture == "topk"
               else None, "steps": result.steps, "stopped": result.stopped,
               "held_out": {"images": len(held_images), **reconstruction_metrics(result.sae, activations[held_mask])},
               "history": result.history}
    questions = data.questions(loaders, held_images)
    if questions:
        metrics["spliced"] = spliced_effect(loaded, result.sae, hook_name, questions, result.mean)
    metadata = {"model_name": loaded.name, "hook_name": hook_name,
                "token_set": "the tokens of the map's grid cells (vision: the tower tokens of each cell)",
                "grid": "cells of the adapter's image grid; a cell's features are its tokens' features by share",
                "normalisation": {"method": "expected_average_only_in", "scale": result.input_scale, "folded": True},
                "seed": config.seed, "dataset": asdict(data), "train_config": asdict(config),
                "command": command, "trained_with": "lvlm_interpret"}
    save_sae(result.sae, out, metadata)
    bundle = LoadedSAE(*load_sae(out), out)
    update, bar = _progress(len(loaders), "top cells", progress)
    save_top_cells(out, top_cells(loaded, bundle, (load() for load in loaders), keys, prompt=data.prompt,
                                  progress=update))
    bar.close()
    metrics["seconds"] = round(time.time() - started, 1)
    metrics["command"] = command
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (out / CACHE_FILE).unlink(missing_ok=True)
    return metrics
