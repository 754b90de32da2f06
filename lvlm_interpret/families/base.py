"""What every model family tells the rest of the product: where its image tokens are and how they tile the image.

A family adapter is the only code that knows a layout. Everything downstream works on `ImageLayout`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import UserInputError


def _runs(positions: np.ndarray) -> list[list[int]]:
    """Ascending-by-one runs of a flat position list as [[first, length], ...] (compact JSON)."""
    runs: list[list[int]] = []
    for position in np.asarray(positions, dtype=np.int64).reshape(-1).tolist():
        if runs and position == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([position, 1])
    return runs


def _from_runs(runs: list[list[int]]) -> np.ndarray:
    return np.concatenate([np.arange(first, first + length) for first, length in runs] or [np.zeros(0)]).astype(
        np.int64)


@dataclass(frozen=True, eq=False)
class ImageView:
    """One grid of an image's tokens: `positions[r, c]` is the input_ids position of the token of cell (r, c),
    rows top to bottom over `box` (x0, y0, x1, y1, in original-image pixels; it can lie partly outside the image
    where the processor pads). The positions need not be contiguous: grids may skip newline or separator tokens,
    and a stitched view gathers the tokens of several tiles."""

    name: str
    positions: np.ndarray  # int64 [rows, cols]
    box: tuple[float, float, float, float]

    @property
    def rows(self) -> int:
        return int(self.positions.shape[0])

    @property
    def cols(self) -> int:
        return int(self.positions.shape[1])

    def to_json(self) -> dict:
        return {"name": self.name, "rows": self.rows, "cols": self.cols, "box": [float(v) for v in self.box],
                "runs": _runs(self.positions)}

    @classmethod
    def from_json(cls, data: dict) -> "ImageView":
        positions = _from_runs(data["runs"]).reshape(data["rows"], data["cols"])
        return cls(name=data["name"], positions=positions, box=tuple(data["box"]))


@dataclass(frozen=True, eq=False)
class ImageLayout:
    """One image's visual tokens as one or more grids (views) over the original image.

    `views[0]` is the image's map: for single-grid families the only grid, for tiled families (LLaVA-NeXT,
    LLaVA-OneVision, Idefics3 / SmolVLM) the high-resolution tiles stitched back into one grid over the original
    image. Further views (the base / global image) are other grids of the same image. `separators` are the
    positions of tokens the processor inserts for the image that are no grid cell (newline, tile-position and
    wrapper tokens); together with every view's cells they are the image's tokens.
    """

    views: tuple[ImageView, ...]
    image_size: tuple[int, int]  # original (width, height)
    separators: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def contiguous(cls, start: int, rows: int, cols: int, box, image_size, name: str = "image") -> "ImageLayout":
        """A single grid stored row-major from `start` (LLaVA-1.5, Qwen2-VL, ...)."""
        positions = np.arange(start, start + rows * cols, dtype=np.int64).reshape(rows, cols)
        return cls(views=(ImageView(name, positions, tuple(float(v) for v in box)),), image_size=tuple(image_size))

    # --- the map's grid (views[0]) ------------------------------------------------------------------------
    @property
    def positions(self) -> np.ndarray:
        return self.views[0].positions

    @property
    def rows(self) -> int:
        return self.views[0].rows

    @property
    def cols(self) -> int:
        return self.views[0].cols

    @property
    def n_cells(self) -> int:
        return self.rows * self.cols

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.views[0].box

    def view(self, name: str) -> ImageView:
        for view in self.views:
            if view.name == name:
                return view
        raise UserInputError(f"this image has no {name!r} view; its views are "
                             f"{', '.join(v.name for v in self.views)}")

    def gather(self, values, view: str | None = None) -> np.ndarray:
        """The [rows, cols] float32 grid of a per-position vector (or [..., positions] array) for one view
        (default: the map's view)."""
        positions = self.positions if view is None else self.view(view).positions
        return np.asarray(values)[..., positions].astype(np.float32)

    def cell_of(self, position: int) -> tuple[int, int] | None:
        """The (row, col) of a position in the map's grid, or None."""
        hits = np.argwhere(self.positions == position)
        return (int(hits[0][0]), int(hits[0][1])) if len(hits) else None

    # --- every token of the image -------------------------------------------------------------------------
    @property
    def cell_positions(self) -> np.ndarray:
        """Sorted positions of every view's cells."""
        return np.unique(np.concatenate([view.positions.reshape(-1) for view in self.views]))

    @property
    def token_positions(self) -> np.ndarray:
        """Sorted positions of every token the image contributes: cells of every view and separators."""
        return np.unique(np.concatenate([self.cell_positions, self.separators]))

    def to_json(self) -> dict:
        return {"image_size": list(self.image_size), "views": [view.to_json() for view in self.views],
                "separators": _runs(self.separators),
                # the map's grid, for readers that need no more
                "rows": self.rows, "cols": self.cols, "box": [float(v) for v in self.box]}

    @classmethod
    def from_json(cls, data: dict) -> "ImageLayout":
        if "views" not in data:
            if "start" not in data:
                raise UserInputError("unreadable image layout in the trace: it has neither 'views' nor 'start'")
            # traces saved before views existed: one contiguous grid
            return cls.contiguous(data["start"], data["rows"], data["cols"], data["box"], data["image_size"])
        return cls(views=tuple(ImageView.from_json(view) for view in data["views"]),
                   image_size=tuple(data["image_size"]), separators=_from_runs(data.get("separators", [])))

    def __eq__(self, other) -> bool:
        return isinstance(other, ImageLayout) and self.to_json() == other.to_json()

    __hash__ = None


@dataclass(frozen=True, eq=False)
class VisionTokens:
    """One image's part of the vision tower's token sequence, for vision-side relevancy.

    The tower's sequence is every image's tokens in image order, and within an image its tiles (or crops) in the
    order the tower encodes them, each with its CLS token where the tower has one. Indices count from the image's
    first token in that sequence."""

    count: int  # tokens the image puts in the tower's sequence
    groups: np.ndarray  # int64 [n_cells, k]: the tower tokens each cell of the map's grid is made of
    readout: np.ndarray  # the tower tokens whose rows, averaged, summarise the map's part of the image
    # float [n_cells, k], each row summing to 1: how much of each token a cell holds (None: equal shares)
    weights: np.ndarray | None = None

    @property
    def shares(self) -> np.ndarray:
        if self.weights is not None:
            return np.asarray(self.weights, dtype=np.float32)
        return np.full(self.groups.shape, 1.0 / self.groups.shape[1], dtype=np.float32)

    @classmethod
    def one_sequence(cls, groups: np.ndarray, count: int, has_cls: bool) -> "VisionTokens":
        """An image the tower encodes as one sequence: summarised by its CLS row (token 0) or by all its rows."""
        readout = np.zeros(1, dtype=np.int64) if has_cls else np.arange(count)
        return cls(count=count, groups=np.asarray(groups, dtype=np.int64), readout=readout)


def merged_patch_groups(rows: int, cols: int, merge: int, first: int = 0) -> np.ndarray:
    """[rows * cols, merge * merge]: for each cell of a rows x cols grid made by merging `merge` x `merge` blocks of
    a row-major patch grid (pooling, pixel shuffle, patch merger) stored from token `first`, its patches."""
    rows_of, cols_of = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    block_rows, block_cols = np.meshgrid(np.arange(merge), np.arange(merge), indexing="ij")
    patch_rows = rows_of.reshape(-1, 1) * merge + block_rows.reshape(1, -1)
    patch_cols = cols_of.reshape(-1, 1) * merge + block_cols.reshape(1, -1)
    return first + patch_rows * (cols * merge) + patch_cols


class ModelFamily:
    """Base adapter. Subclasses set `name` and `model_types` and implement `grids` and `build_random`."""

    name: str = ""
    model_types: tuple[str, ...] = ()

    # --- image layout -------------------------------------------------------------------------------
    def image_layouts(self, model: nn.Module, processor, inputs, images: list[Image.Image]) -> list[ImageLayout]:
        """The layout of every image of a processed input (batch of one). This default suits families with one
        contiguous grid per image (described by `grids`); tiled families override it."""
        grids = self.grids(model, processor, inputs, images)
        starts = self.image_token_runs(model, inputs, [skip + rows * cols for rows, cols, skip, _ in grids])
        return [ImageLayout.contiguous(start + skip, rows, cols, box, image.size)
                for start, (rows, cols, skip, box), image in zip(starts, grids, images, strict=True)]

    def image_token_runs(self, model: nn.Module, inputs, counts: list[int]) -> list[int]:
        """The first position of each image's run of image tokens in input_ids, checking that image k has `counts[k]`
        consecutive image tokens and that no image token is left over."""
        positions = (inputs["input_ids"][0] == self.image_token_id(model)).nonzero().flatten().tolist()
        starts, cursor = [], 0
        for index, count in enumerate(counts):
            run = positions[cursor:cursor + count]
            if len(run) != count or run[-1] - run[0] != count - 1:
                raise RuntimeError(
                    f"{self.name}: expected {count} consecutive image tokens for image {index}, found {len(run)} in "
                    "input_ids"
                )
            starts.append(run[0])
            cursor += count
        if cursor != len(positions):
            raise RuntimeError(f"{self.name}: {len(positions) - cursor} image tokens in input_ids belong to no image")
        return starts

    def image_token_id(self, model: nn.Module) -> int:
        return int(model.config.image_token_id)

    def grids(self, model, processor, inputs, images) -> list[tuple[int, int, int, tuple]]:
        """Per image: (rows, cols, tokens to skip before the grid, box in original pixels)."""
        raise NotImplementedError

    # --- module handles -------------------------------------------------------------------------------
    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def language_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.language_model(model).layers)

    def language_attentions(self, model: nn.Module) -> list[nn.Module]:
        return [layer.self_attn for layer in self.language_layers(model)]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.language_model(model).norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def vision_layers(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def vision_attentions(self, model: nn.Module) -> list[nn.Module]:
        return [layer.self_attn for layer in self.vision_layers(model)]

    # --- how LM image tokens map onto the vision tower's tokens (for vision-side relevancy) ----------------
    # per-position model inputs whose value over the generated tokens differs from the prompt's text (replays keep it)
    answer_input_values: dict[str, int] = {}

    def mask_image_side_inputs(self, decoder_kwargs: dict, positions: list[int], images: list[np.ndarray],
                               zero: bool = False) -> dict:
        """The decoder's keyword inputs with whatever besides the input embeddings carries the image tokens at
        `positions` into the LM (Qwen3-VL's DeepStack features) replaced by its mean over the tokens of the same
        image (`images`: each image's token positions), or by zeros, so that masking a token removes it by every
        path. Most families have nothing besides the embeddings."""
        return decoder_kwargs

    def vision_tokens(self, model: nn.Module, layout: ImageLayout) -> "VisionTokens":
        """Where the image's map cells come from in the vision tower's token sequence."""
        raise NotImplementedError

    def load_processor(self, source: str, trust_remote_code: bool = False):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)

    # --- tiny random models for tests and benchmarks ------------------------------------------------------
    def build_random(self, preset: dict) -> tuple[nn.Module, object]:
        """A random-initialised model and a working offline processor from a preset in configs/."""
        raise NotImplementedError


def seeded_model(model_class, config, seed: int) -> nn.Module:
    """Build `model_class` from `config` with weights that depend only on `seed`."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_class(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
