"""An image's activations at a hook point, the rows an SAE reads, and how they make the map's grid.

The SAE reads one row per token: for `lm.*` hooks the image's tokens in the LM's sequence (every view's cells), for
`vision.*` hooks the tower tokens the adapter's grid cells are made of (`ModelFamily.vision_tokens`: a LLaVA cell
is one patch, a Qwen2-VL cell four merged patches; CLS and tokens of no cell are left out). A cell's features are
its tokens' features weighted by their shares, so every map lands on the same grid as the explanation maps.

A hook's value is read flattened to [-1, d] (the LM's [1, seq, d], LLaVA's tower [images, seq, d], Qwen2-VL's
[tokens, d]); where the tower runs once per image or tile, the calls' rows follow each other in call order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..capture import build_inputs
from ..errors import UserInputError
from ..families.base import ImageLayout
from ..analysis.hooks import hook_point, hooked, model_inputs

DEFAULT_PROMPT = "Describe the image."
READABLE_POINTS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_embed",
                   "hook_normalized")


@dataclass(frozen=True)
class Site:
    """One image's rows in a hook's flattened value, and the map's grid made of them."""

    hook_name: str
    rows: np.ndarray  # int64 [n]: the rows the SAE reads, ascending
    cell_rows: np.ndarray  # int64 [n_cells, k]: for each grid cell, indices into `rows`
    cell_weights: np.ndarray  # float32 [n_cells, k]: each cell's shares of its rows (summing to 1)
    layout: ImageLayout  # the image's layout in the request

    @property
    def grid(self) -> tuple[int, int]:
        return self.layout.rows, self.layout.cols

    def cells(self, per_row: torch.Tensor) -> torch.Tensor:
        """[rows, cols, ...] of a per-row tensor [n, ...] (e.g. feature activations)."""
        weights = torch.as_tensor(self.cell_weights, dtype=per_row.dtype, device=per_row.device)
        picked = per_row[torch.as_tensor(self.cell_rows, device=per_row.device)]  # [cells, k, ...]
        weights = weights.reshape(*weights.shape, *([1] * (picked.dim() - 2)))
        return (picked * weights).sum(1).reshape(*self.grid, *per_row.shape[1:])


def check_hook_name(loaded, hook_name: str) -> None:
    """The point must exist on this model and carry token activations (not masks, patterns or logits)."""
    hook_point(loaded, hook_name)  # unknown names and layers out of range get their own message
    if not hook_name.endswith(READABLE_POINTS) or hook_name == "lm.hook_logits":
        raise UserInputError(f"an SAE reads token activations: {hook_name!r} is not one; use a point ending in "
                             f"{', '.join(READABLE_POINTS[:4])} (e.g. vision.blocks.3.hook_resid_post or "
                             f"lm.blocks.1.hook_resid_post)")


def image_site(loaded, hook_name: str, layouts: list[ImageLayout], image_index: int = 0) -> Site:
    layout = layouts[image_index]
    if hook_name.startswith("vision."):
        tokens = [loaded.family.vision_tokens(loaded.model, each) for each in layouts]
        offset = int(sum(part.count for part in tokens[:image_index]))
        groups, shares = tokens[image_index].groups, tokens[image_index].shares
        rows = np.unique(groups)
        cell_rows = np.searchsorted(rows, groups)
        return Site(hook_name, rows + offset, cell_rows, shares.astype(np.float32), layout)
    rows = layout.cell_positions
    cell_rows = np.searchsorted(rows, layout.positions.reshape(-1))[:, None]
    return Site(hook_name, rows, cell_rows, np.ones(cell_rows.shape, np.float32), layout)


class RowHook:
    """A hook function that reads (and, with `edit`, rewrites) the site's rows of every call of one forward:
    `edit(rows [n, d]) -> [n, d]`. Calls beyond the rows (the one-token steps of `generate`) pass untouched."""

    def __init__(self, site: Site, edit: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.site, self.edit = site, edit
        self.cursor = 0
        self.read: list[torch.Tensor] = []

    def __call__(self, value: torch.Tensor, name: str):
        flat = value.reshape(-1, value.shape[-1])
        rows = torch.as_tensor(self.site.rows, device=value.device)
        mine = (rows >= self.cursor) & (rows < self.cursor + flat.shape[0])
        local = rows[mine] - self.cursor
        self.cursor += flat.shape[0]
        if not bool(mine.any()):
            return None
        self.read.append(flat[local].detach())
        if self.edit is None:
            return None
        edited = flat.clone()
        edited[local] = self.edit(flat[local]).to(flat.dtype)
        return edited.reshape(value.shape)

    def rows(self) -> torch.Tensor:
        if not self.read:
            raise UserInputError(f"{self.site.hook_name} did not run on this image's tokens")
        return torch.cat(self.read)


def request_site(loaded, hook_name: str, image, prompt: str = DEFAULT_PROMPT):
    """(the model inputs of one image asked `prompt`, the image's site)."""
    inputs = build_inputs(loaded, [image], prompt)
    layouts = loaded.family.image_layouts(loaded.model, loaded.processor, inputs, [image])
    return inputs, image_site(loaded, hook_name, layouts)


@torch.no_grad()
def image_activations(loaded, hook_name: str, image, prompt: str = DEFAULT_PROMPT) -> tuple[torch.Tensor, Site]:
    """(the site's activations [n, d] float32 on the CPU, the site) of one image asked `prompt`."""
    inputs, site = request_site(loaded, hook_name, image, prompt)
    reader = RowHook(site)
    with hooked(loaded, [(hook_name, reader)]):
        loaded.model(**model_inputs(loaded, dict(inputs)), use_cache=False)
    return reader.rows().float().cpu(), site


def cache_activations(loaded, hook_name: str, images: Iterable, prompt: str = DEFAULT_PROMPT,
                      progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations [tokens, d] float16, image index of each token [tokens] int32) over `images`."""
    chunks, owners = [], []
    for index, image in enumerate(images):
        rows, _ = image_activations(loaded, hook_name, image, prompt)
        if not torch.isfinite(rows).all():
            raise UserInputError(f"{hook_name} gave non-finite activations on image {index}")
        chunks.append(rows.half())
        owners.append(torch.full((rows.shape[0],), index, dtype=torch.int32))
        if progress:
            progress(index + 1)
    if not chunks:
        raise UserInputError("no images to cache activations from")
    return torch.cat(chunks), torch.cat(owners)


def shapes_images(n: int, seed_start: int = 0, size: int = 192) -> Iterator:
    from ..demo.scenes import draw_scene

    for seed in range(seed_start, seed_start + n):
        yield draw_scene(seed, size).image
