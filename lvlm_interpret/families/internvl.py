"""InternVL (2.5 / 3, transformers-native) layout: tiles of the stretched image plus a thumbnail, pixel-shuffled.

The image processor picks the tile arrangement (cols x rows, `min_patches`..`max_patches` tiles) whose aspect ratio
is closest to the image's, resizes (stretches) the whole image to it and cuts it into tiles, row by row, then adds
a thumbnail of the whole image when there is more than one tile. The tower encodes each tile; pixel shuffle turns
its patch grid into side x side tokens (row-major). Per image: <img>, the tiles' tokens tile after tile, the
thumbnail's, </img>. The map is the tiles stitched back into one grid over the image; the thumbnail is a view.
"""

from __future__ import annotations

import math

import numpy as np
from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVisionConfig,
    Qwen2Config,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from ..models.word_tokenizer import COMMON_WORDS, build_word_tokenizer
from .base import ImageLayout, ImageView, ModelFamily, VisionTokens, merged_patch_groups, seeded_model

START, END, CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", START, END, CONTEXT, VIDEO]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class InternVLImageOnlyProcessor(InternVLProcessor):
    """InternVL's processor without its video processor, which needs torchvision (absent from CPU installs)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)


def tiles_then_thumbnail(start: int, side: int, tile_rows: int, tile_cols: int, box, image_size,
                         separators) -> ImageLayout:
    """Tiles of side x side tokens stored tile after tile (row-major tiles, row-major cells) from `start`,
    stitched into one (tile_rows * side) x (tile_cols * side) grid; then the thumbnail's side x side tokens when
    there are several tiles."""
    rows, cols = np.meshgrid(np.arange(tile_rows * side), np.arange(tile_cols * side), indexing="ij")
    tile = (rows // side) * tile_cols + cols // side
    tiles = start + tile * side * side + (rows % side) * side + cols % side
    views = [ImageView("tiles", tiles, box)]
    n_tiles = tile_rows * tile_cols
    if n_tiles > 1:
        thumbnail_start = start + n_tiles * side * side
        views.append(ImageView("thumbnail", np.arange(thumbnail_start, thumbnail_start + side * side).reshape(
            side, side), box))
    return ImageLayout(views=tuple(views), image_size=image_size, separators=np.asarray(separators))


class InternVLFamily(ModelFamily):
    name = "internvl"
    model_types = ("internvl",)
    def image_layouts(self, model, processor, inputs, images):
        side = math.isqrt(processor.image_seq_length)
        image_processor = processor.image_processor
        tile_px = (image_processor.size["height"], image_processor.size["width"])
        # the processor's own images default (crop_to_patches=True) wins over the image processor's attribute
        crop = processor.images_kwargs.get("crop_to_patches", image_processor.crop_to_patches)
        arrangements = []
        for image in images:
            tile_cols, tile_rows = get_optimal_tiled_canvas(
                (image.height, image.width), tile_px, image_processor.min_patches, image_processor.max_patches) \
                if crop else (1, 1)
            arrangements.append((tile_rows, tile_cols))
        counts = [side * side * (rows * cols + (rows * cols > 1)) for rows, cols in arrangements]
        starts = self.image_token_runs(model, inputs, counts)
        # the whole image is stretched onto the tiles and onto the thumbnail: both cover all of it
        return [tiles_then_thumbnail(start, side, rows, cols, (0.0, 0.0, float(image.width), float(image.height)),
                                     image.size, [start - 1, start + count])
                for start, count, (rows, cols), image in zip(starts, counts, arrangements, images, strict=True)]

    def vision_tokens(self, model, layout):
        # the tower encodes the tiles row by row, then the thumbnail, each as CLS + a patch grid; pixel shuffle
        # merges merge x merge patches into each token (downsample_ratio 0.5: 2 x 2)
        vision = model.config.vision_config
        patches = vision.image_size[0] // vision.patch_size[0]
        per_crop = 1 + patches * patches
        merge = round(1 / model.config.downsample_ratio)
        side = patches // merge
        tile_rows, tile_cols = layout.rows // side, layout.cols // side
        n_crops = tile_rows * tile_cols + (tile_rows * tile_cols > 1)
        cell_rows, cell_cols = np.meshgrid(np.arange(layout.rows), np.arange(layout.cols), indexing="ij")
        tiles = ((cell_rows // side) * tile_cols + cell_cols // side).reshape(-1, 1)
        in_tile = merged_patch_groups(side, side, merge, first=1)[((cell_rows % side) * side + cell_cols % side)
                                                                   .reshape(-1)]
        return VisionTokens(count=n_crops * per_crop, groups=tiles * per_crop + in_tile,
                            readout=np.arange(tile_rows * tile_cols) * per_crop)  # the tiles' CLS rows

    def vision_layers(self, model):
        return list(model.model.vision_tower.encoder.layer)

    def vision_attentions(self, model):
        return [layer.attention for layer in self.vision_layers(model)]

    def load_processor(self, source, trust_remote_code=False):
        # AutoProcessor would also build the video processor, which needs torchvision
        return InternVLImageOnlyProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)

    def build_random(self, preset):
        tokenizer = build_word_tokenizer(COMMON_WORDS + ["user", "assistant", "system"], SPECIAL_TOKENS,
                                         CHAT_TEMPLATE, start_image_token=START, end_image_token=END,
                                         context_image_token=CONTEXT, video_token=VIDEO)
        ids = tokenizer.convert_tokens_to_ids
        image = preset["image"]
        tile, patch = image["tile"], image["patch"]
        side = tile // patch // 2  # pixel shuffle halves each side
        config = InternVLConfig(
            vision_config=InternVLVisionConfig(image_size=[tile, tile], patch_size=[patch, patch],
                                               **preset["vision_config"]),
            text_config=Qwen2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
                                    **preset["text_config"]),
            image_token_id=ids(CONTEXT),
            image_seq_length=side * side,
        )
        processor = InternVLImageOnlyProcessor(
            image_processor=GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True,
                                                     min_patches=1, max_patches=image["max_tiles"]),
            tokenizer=tokenizer,
            image_seq_length=side * side,
            chat_template=CHAT_TEMPLATE,
        )
        return seeded_model(InternVLForConditionalGeneration, config, preset.get("seed", 0)), processor
