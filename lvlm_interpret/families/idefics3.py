"""Idefics3 / SmolVLM layout: the image split into sub-images (tiles) plus a global image, each its own token block.

The processor resizes the image so both sides are multiples of the tile size, cuts it into rows x cols tiles and
squashes the whole image into one more tile (the global image). In input_ids every tile is
`<fake_token_around_image><row_i_col_j>` then side x side image tokens (the pixel-shuffled patch grid, row-major),
and the global image is `<fake_token_around_image><global-img>` then its block and a closing fake token. The map is
the tiles stitched back into one grid over the whole image; a small image is not split and has only its global view.
"""

from __future__ import annotations

import numpy as np
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
)
from transformers.processing_utils import ProcessorMixin

from ..models.word_tokenizer import COMMON_WORDS, build_word_tokenizer
from .base import ImageLayout, ImageView, ModelFamily, VisionTokens, merged_patch_groups, seeded_model

FAKE_TOKEN, IMAGE_TOKEN, GLOBAL_TOKEN, END_TOKEN = "<fake_token_around_image>", "<image>", "<global-img>", \
    "<end_of_utterance>"
TILE_TOKENS = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]  # the processor's 6 x 6 at most
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class SmolVLMImageOnlyProcessor(SmolVLMProcessor):
    """SmolVLM's processor without its video processor, which needs torchvision (absent from CPU installs)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_len=image_seq_len, chat_template=chat_template,
                         **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        # SmolVLMProcessor's own version reads video defaults from the absent video processor
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


class Idefics3Family(ModelFamily):
    name = "idefics3"
    model_types = ("idefics3",)
    config_class, model_class = Idefics3Config, Idefics3ForConditionalGeneration
    processor_class, image_processor_class = Idefics3Processor, Idefics3ImageProcessorPil
    def image_layouts(self, model, processor, inputs, images):
        ids = inputs["input_ids"][0].numpy()
        tokens = processor.tokenizer.convert_tokens_to_ids
        tile_ids = {tokens(token): divmod(k, 6) for k, token in enumerate(TILE_TOKENS)}
        fake, global_id = tokens(FAKE_TOKEN), tokens(GLOBAL_TOKEN)
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size \
            // model.config.scale_factor
        block = np.arange(side * side).reshape(side, side)
        is_image = ids == self.image_token_id(model)
        # each block of image tokens is one tile or one global image, named by the token in front of it
        starts = [p for p in np.flatnonzero(is_image) if not is_image[p - 1]]
        layouts, tiles, first = [], {}, None
        for start in starts:
            if not is_image[start:start + side * side].all() or start + side * side < len(ids) and \
                    is_image[start + side * side]:
                raise RuntimeError(f"{self.name}: an image block of {side * side} tokens was expected at {start}")
            marker = int(ids[start - 1])
            first = start - 2 if first is None else first  # the block's <fake_token_around_image>
            if marker in tile_ids:
                tiles[tile_ids[marker]] = start + block
                continue
            if marker != global_id:
                raise RuntimeError(f"{self.name}: image tokens at {start} follow neither a tile nor a global tag")
            if len(layouts) == len(images):
                raise RuntimeError(f"{self.name}: more images in input_ids than the {len(images)} given")
            image = images[len(layouts)]
            whole = (0.0, 0.0, float(image.width), float(image.height))
            views = [ImageView("global", start + block, whole)]
            if tiles:
                rows, cols = max(r for r, _ in tiles) + 1, max(c for _, c in tiles) + 1
                if len(tiles) != rows * cols:
                    raise RuntimeError(f"{self.name}: image {len(layouts)} has {len(tiles)} tiles, not {rows}x{cols}")
                stitched = np.block([[tiles[(r, c)] for c in range(cols)] for r in range(rows)])
                views.insert(0, ImageView("tiles", stitched, whole))
            end = start + side * side  # the closing <fake_token_around_image>
            if ids[first] != fake or ids[end] != fake:
                raise RuntimeError(f"{self.name}: image {len(layouts)} is not wrapped in {FAKE_TOKEN}")
            cells = np.concatenate([view.positions.ravel() for view in views])
            span = np.arange(first, end + 1)
            layouts.append(ImageLayout(views=tuple(views), image_size=image.size,
                                       separators=span[~np.isin(span, cells)]))
            tiles, first = {}, None
        if len(layouts) != len(images) or tiles:
            raise RuntimeError(f"{self.name}: found {len(layouts)} images in input_ids for {len(images)} given")
        return layouts

    def vision_tokens(self, model, layout):
        # the tower encodes the tiles row by row, then the global image, each as one patch grid (no CLS); pixel
        # shuffle merges scale x scale patches into each token
        scale = model.config.scale_factor
        per_crop = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
        side = layout.views[-1].rows  # the global view's side, as every tile's
        tile_rows, tile_cols = layout.rows // side, layout.cols // side
        n_tiles = tile_rows * tile_cols if layout.views[0].name == "tiles" else 0
        cell_rows, cell_cols = np.meshgrid(np.arange(layout.rows), np.arange(layout.cols), indexing="ij")
        crops = ((cell_rows // side) * tile_cols + cell_cols // side).reshape(-1, 1)
        in_crop = merged_patch_groups(side, side, scale)[((cell_rows % side) * side + cell_cols % side).reshape(-1)]
        used = np.unique(crops)  # the map's crops: every tile, or the global image alone
        return VisionTokens(count=(n_tiles + 1) * per_crop, groups=crops * per_crop + in_crop,
                            readout=(used[:, None] * per_crop + np.arange(per_crop)).reshape(-1))

    def language_model(self, model):
        return model.model.text_model

    def vision_layers(self, model):
        return list(model.model.vision_model.encoder.layers)

    def build_random(self, preset):
        tokenizer = build_word_tokenizer(COMMON_WORDS + ["user", "assistant"],
                                         [FAKE_TOKEN, IMAGE_TOKEN, GLOBAL_TOKEN, END_TOKEN, *TILE_TOKENS],
                                         CHAT_TEMPLATE)
        image = preset["image"]
        tile, patch, scale = image["tile"], image["patch"], image["scale_factor"]
        config = self.config_class(
            vision_config={"image_size": tile, "patch_size": patch, **preset["vision_config"]},
            text_config={
                "model_type": "llama",
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.convert_tokens_to_ids(END_TOKEN),
                "pad_token_id": tokenizer.pad_token_id,
                **preset["text_config"],
            },
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            scale_factor=scale,
        )
        processor = self.processor_class(
            image_processor=self.image_processor_class(
                size={"longest_edge": image["longest_edge"]}, max_image_size={"longest_edge": tile},
                do_image_splitting=True),
            tokenizer=tokenizer,
            image_seq_len=(tile // patch // scale) ** 2,
            chat_template=CHAT_TEMPLATE,
        )
        model = seeded_model(self.model_class, config, preset.get("seed", 0))
        # an untrained model could write image-layout tokens, which would break the replay of its answer
        model.generation_config.suppress_tokens = tokenizer.convert_tokens_to_ids(
            [FAKE_TOKEN, IMAGE_TOKEN, GLOBAL_TOKEN, *TILE_TOKENS])
        return model, processor


class SmolVLMFamily(Idefics3Family):
    name = "smolvlm"
    model_types = ("smolvlm",)
    config_class, model_class = SmolVLMConfig, SmolVLMForConditionalGeneration
    processor_class, image_processor_class = SmolVLMImageOnlyProcessor, SmolVLMImageProcessorPil

    def load_processor(self, source, trust_remote_code=False):
        return self.processor_class.from_pretrained(source, trust_remote_code=trust_remote_code)
