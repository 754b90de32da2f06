"""LLaVA-NeXT (LLaVA-1.6) layout: any-resolution tiles stitched into one high-resolution grid, plus a base image.

Per image the processor writes one run of image tokens: the base view (the whole image squashed to one tile,
side x side cells) and then the high-resolution view: the image resized to the best pinpoint resolution, padded,
cut into tiles, the tiles' cells stitched row by row, the padding rows / columns cut off ("unpadding"), and an
image_newline token after every row. The map is the stitched view placed on the original image.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension

from ..errors import UserInputError
from ..models.word_tokenizer import COMMON_WORDS, build_word_tokenizer
from .base import ImageLayout, ImageView, VisionTokens, seeded_model
from .llava import CHAT_TEMPLATE, IMAGE_TOKEN, LlavaFamily, llava_config


class StitchedGrid(NamedTuple):
    rows: int  # the unpadded grid's cells
    cols: int
    box: tuple  # what it covers, in original pixels
    tile_rows: int  # the tiles the padded image is cut into
    tile_cols: int
    top_cell: int  # where the unpadded grid starts in the tiles' cell grid
    left_cell: int


def stitched_grid(image_height: int, image_width: int, pinpoints: list, tile_px: int, side: int) -> StitchedGrid:
    """The unpadded high-resolution grid, the box it covers in original pixels, and its place on the tiles.

    The cut is transformers' `unpad_image` on the tiles' cell grid; the box follows where the image processor put
    the resized image on the padded canvas, so it is exact up to the half-cell rounding of the cut."""
    best_height, best_width = select_best_resolution((image_height, image_width), pinpoints)
    full_rows, full_cols = best_height // tile_px * side, best_width // tile_px * side
    rows, cols, top_cell, left_cell = full_rows, full_cols, 0, 0
    if image_width / image_height > full_cols / full_rows:
        kept = int(round(image_height * (full_cols / image_width), 7))
        top_cell = (full_rows - kept) // 2
        rows = full_rows - 2 * top_cell
    else:
        kept = int(round(image_width * (full_rows / image_height), 7))
        left_cell = (full_cols - kept) // 2
        cols = full_cols - 2 * left_cell
    resized_height, resized_width = get_patch_output_size(
        np.empty((1, image_height, image_width), dtype=np.uint8), (best_height, best_width), ChannelDimension.FIRST)
    top_px, left_px = (best_height - resized_height) // 2, (best_width - resized_width) // 2
    cell_px = tile_px / side
    sx, sy = image_width / resized_width, image_height / resized_height
    box = ((left_cell * cell_px - left_px) * sx, (top_cell * cell_px - top_px) * sy,
           ((left_cell + cols) * cell_px - left_px) * sx, ((top_cell + rows) * cell_px - top_px) * sy)
    return StitchedGrid(rows, cols, box, best_height // tile_px, best_width // tile_px, top_cell, left_cell)


def base_then_rows_with_newlines(start: int, side: int, rows: int, cols: int, base_box, tiles_box,
                                 image_size) -> ImageLayout:
    """The LLaVA-NeXT / OneVision token order: side x side base cells, then the stitched grid row by row, each row
    followed by one newline token."""
    base = np.arange(start, start + side * side).reshape(side, side)
    row_starts = start + side * side + np.arange(rows) * (cols + 1)
    tiles = row_starts[:, None] + np.arange(cols)[None, :]
    return ImageLayout(views=(ImageView("tiles", tiles, tiles_box), ImageView("base", base, base_box)),
                       image_size=image_size, separators=row_starts + cols)


class LlavaNextFamily(LlavaFamily):
    name = "llava_next"
    model_types = ("llava_next",)
    # the strategies whose tiles give side x side features each (CLIP's CLS dropped)
    feature_strategies = ("default",)

    def image_layouts(self, model, processor, inputs, images):
        config = model.config
        if config.vision_feature_select_strategy not in self.feature_strategies:
            raise UserInputError(f"{self.name}: checkpoints with vision_feature_select_strategy "
                                 f"{config.vision_feature_select_strategy!r} are not supported; use one with "
                                 f"{' or '.join(map(repr, self.feature_strategies))}")
        side = config.vision_config.image_size // config.vision_config.patch_size
        grids = [self.high_resolution_grid(config, height, width, side)
                 for height, width in inputs["image_sizes"].tolist()]
        starts = self.image_token_runs(model, inputs, [side * side + grid.rows * (grid.cols + 1) for grid in grids])
        return [
            base_then_rows_with_newlines(start, side, grid.rows, grid.cols,
                                         (0.0, 0.0, float(image.width), float(image.height)), grid.box, image.size)
            for start, grid, image in zip(starts, grids, images, strict=True)
        ]

    def high_resolution_grid(self, config, height: int, width: int, side: int) -> StitchedGrid:
        return stitched_grid(height, width, config.image_grid_pinpoints, config.vision_config.image_size, side)

    def vision_tokens(self, model, layout):
        # the tower encodes the base image, then the tiles row by row, each as its own sequence (CLS first for CLIP)
        config = model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        width, height = layout.image_size
        grid = stitched_grid(height, width, config.image_grid_pinpoints, config.vision_config.image_size, side)
        has_cls = int(getattr(self.vision_embeddings(model), "class_embedding", None) is not None)
        per_tile = side * side + has_cls
        rows, cols = np.meshgrid(np.arange(grid.rows) + grid.top_cell, np.arange(grid.cols) + grid.left_cell,
                                 indexing="ij")
        tiles = 1 + (rows // side) * grid.tile_cols + cols // side  # crop 0 is the base image
        tokens = tiles * per_tile + has_cls + (rows % side) * side + cols % side
        groups, weights = self.cells_of_stitched_grid(tokens, layout)
        used = np.unique(tiles)
        readout = used * per_tile if has_cls else (used[:, None] * per_tile + np.arange(per_tile)).reshape(-1)
        return VisionTokens(count=(1 + grid.tile_rows * grid.tile_cols) * per_tile, groups=groups,
                            readout=readout.astype(np.int64), weights=weights)

    def vision_embeddings(self, model):
        tower = model.model.vision_tower
        return getattr(tower, "vision_model", tower).embeddings

    def cells_of_stitched_grid(self, tokens: np.ndarray, layout):
        """(groups, weights) of the map's cells from the stitched grid's tower tokens: one token each here."""
        return tokens.reshape(-1, 1), None

    def build_random(self, preset):
        tokenizer = build_word_tokenizer(COMMON_WORDS + ["user", "assistant"], [IMAGE_TOKEN], CHAT_TEMPLATE)
        image = preset["image"]
        tile, patch, pinpoints = image["tile"], image["patch"], image["pinpoints"]
        config = llava_config(tokenizer, tile, patch, preset["vision_config"], preset["text_config"],
                              config_class=LlavaNextConfig, image_grid_pinpoints=pinpoints)
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": tile},
                                                       crop_size={"height": tile, "width": tile},
                                                       image_grid_pinpoints=pinpoints),
            tokenizer=tokenizer,
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
            chat_template=CHAT_TEMPLATE,
        )
        model = seeded_model(LlavaNextForConditionalGeneration, config, preset.get("seed", 0))
        # an untrained model could write <image>, which would break the replay of its answer
        model.generation_config.suppress_tokens = [config.image_token_id]
        return model, processor
