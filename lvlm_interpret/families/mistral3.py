"""Mistral 3 (Mistral-Small-3.1 / Pixtral-style) layout: rows of merged-patch tokens, each row closed by a separator.

The processor resizes the image (aspect kept, sides rounded up to `patch * spatial_merge_size`) and writes row by
row `cols` x [IMG] then [IMG_BREAK], the last row's break replaced by [IMG_END]; the projector merges 2 x 2 patches
into each [IMG] token. The grid therefore skips one separator per row: positions are not contiguous.
"""

from __future__ import annotations

import sys

import numpy as np
from transformers import (
    MistralConfig,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessorPil,
    PixtralVisionConfig,
)

from ..models.word_tokenizer import COMMON_WORDS, build_word_tokenizer
from .base import ImageLayout, ImageView, ModelFamily, VisionTokens, merged_patch_groups, seeded_model

IMAGE, BREAK, END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
SPECIAL_TOKENS = ["[INST]", "[/INST]", IMAGE, BREAK, END]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST]{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}[IMG]{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}[/INST]"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def pixtral_processor_class():
    """transformers' PixtralProcessor, also without torchvision: its module imports one helper,
    `get_resize_output_image_size`, from the torchvision image processor module; the PIL module defines it too."""
    torchvision_module = "transformers.models.pixtral.image_processing_pixtral"
    try:
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor
    except ModuleNotFoundError:
        from transformers.models.pixtral import image_processing_pil_pixtral

        sys.modules[torchvision_module] = image_processing_pil_pixtral
        try:
            from transformers.models.pixtral.processing_pixtral import PixtralProcessor
        finally:
            del sys.modules[torchvision_module]
    return PixtralProcessor


class Mistral3Family(ModelFamily):
    name = "mistral3"
    model_types = ("mistral3",)
    def image_layouts(self, model, processor, inputs, images):
        ids = inputs["input_ids"][0].numpy()
        tokenizer = processor.tokenizer
        image_id = self.image_token_id(model)
        break_id, end_id = tokenizer.convert_tokens_to_ids(BREAK), tokenizer.convert_tokens_to_ids(END)
        step = model.config.vision_config.patch_size * model.config.spatial_merge_size
        ends = np.flatnonzero(ids == end_id)
        if len(ends) != len(images) or len(inputs["image_sizes"]) != len(images):
            raise RuntimeError(f"{self.name}: {len(ends)} {END} tokens in input_ids for {len(images)} images")
        layouts, first = [], 0
        for (height, width), end, image in zip(inputs["image_sizes"].tolist(), ends, images, strict=True):
            rows, cols = height // step, width // step
            start = end + 1 - rows * (cols + 1)
            block = np.arange(start, end + 1).reshape(rows, cols + 1)
            if start < first or not (ids[block[:, :cols]] == image_id).all() or \
                    not (ids[block[:-1, cols]] == break_id).all():
                raise RuntimeError(f"{self.name}: image {len(layouts)} is not {rows} rows of {cols} {IMAGE} tokens "
                                   f"each closed by {BREAK} / {END} in input_ids")
            # the resize keeps the aspect ratio and only rounds the sides up to whole tokens: the grid covers it all
            box = (0.0, 0.0, float(image.width), float(image.height))
            layouts.append(ImageLayout(views=(ImageView("image", block[:, :cols].copy(), box),),
                                       image_size=image.size, separators=block[:, cols].copy()))
            first = end + 1
        if int((ids == image_id).sum()) != sum(layout.n_cells for layout in layouts):
            raise RuntimeError(f"{self.name}: some {IMAGE} tokens in input_ids belong to no image")
        return layouts

    def vision_tokens(self, model, layout):
        # Pixtral runs every image's patch grid (row-major, no CLS) in one sequence with a block-diagonal mask;
        # the patch merger makes each token of merge x merge patches
        merge = model.config.spatial_merge_size
        groups = merged_patch_groups(layout.rows, layout.cols, merge)
        return VisionTokens.one_sequence(groups, groups.size, has_cls=False)

    def vision_layers(self, model):
        return list(model.model.vision_tower.transformer.layers)

    def vision_attentions(self, model):
        return [layer.attention for layer in self.vision_layers(model)]

    def load_processor(self, source, trust_remote_code=False):
        return pixtral_processor_class().from_pretrained(source, trust_remote_code=trust_remote_code)

    def build_random(self, preset):
        tokenizer = build_word_tokenizer(COMMON_WORDS, SPECIAL_TOKENS, CHAT_TEMPLATE)
        ids = tokenizer.convert_tokens_to_ids
        image = preset["image"]
        config = Mistral3Config(
            vision_config=PixtralVisionConfig(image_size=image["longest_edge"], patch_size=image["patch"],
                                              **preset["vision_config"]),
            text_config=MistralConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                      **preset["text_config"]),
            image_token_index=ids(IMAGE),
            spatial_merge_size=image["merge"],
            vision_feature_layer=-1,
        )
        processor = pixtral_processor_class()(
            image_processor=PixtralImageProcessorPil(size={"longest_edge": image["longest_edge"]},
                                                     patch_size=image["patch"]),
            tokenizer=tokenizer,
            patch_size=image["patch"],
            spatial_merge_size=image["merge"],
            chat_template=CHAT_TEMPLATE,
        )
        return seeded_model(Mistral3ForConditionalGeneration, config, preset.get("seed", 0)), processor
