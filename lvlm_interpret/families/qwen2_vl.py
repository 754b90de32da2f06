"""Qwen2-VL layout: any-resolution patches, 2x2 patches merged into one LM token, grid from `image_grid_thw`."""

from __future__ import annotations

import numpy as np
from transformers import (
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from ..models.word_tokenizer import COMMON_WORDS, build_word_tokenizer
from .base import ModelFamily, VisionTokens, seeded_model

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<|video_pad|>", "<|endoftext|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def image_only_processor(processor_class):
    """A Qwen processor class without its video processor, which needs torchvision (absent from CPU installs)."""

    class ImageOnly(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"{processor_class.__name__}ImageOnly"
    return ImageOnly


class Qwen2VLFamily(ModelFamily):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    # what a later Qwen generation replaces to reuse this adapter (see qwen2_5_vl.py, qwen3_vl.py)
    config_class = Qwen2VLConfig
    model_class = Qwen2VLForConditionalGeneration
    processor_class = image_only_processor(Qwen2VLProcessor)

    def grids(self, model, processor, inputs, images):
        merge = model.config.vision_config.spatial_merge_size
        grids = []
        for (frames, height, width), image in zip(inputs["image_grid_thw"].tolist(), images, strict=True):
            if frames != 1:
                raise ValueError("qwen2_vl: only still images are supported (image_grid_thw has t != 1)")
            # smart_resize keeps the whole image (only rounding the sides), so the grid covers all of it.
            grids.append((height // merge, width // merge, 0, (0.0, 0.0, float(image.width), float(image.height))))
        return grids

    def vision_layers(self, model):
        return list(model.model.visual.blocks)

    def vision_attentions(self, model):
        return [block.attn for block in self.vision_layers(model)]

    def vision_tokens(self, model, layout):
        # the processor orders patches merge-window by merge-window: LM token i is made of patches 4i .. 4i+3;
        # no CLS token: the image is summarised by all its rows
        merge = model.config.vision_config.spatial_merge_size
        groups = np.arange(layout.n_cells * merge * merge).reshape(layout.n_cells, merge * merge)
        return VisionTokens.one_sequence(groups, groups.size, has_cls=False)

    def load_processor(self, source, trust_remote_code=False):
        # AutoProcessor would also build the video processor, which needs torchvision
        return self.processor_class.from_pretrained(source, trust_remote_code=trust_remote_code)

    def build_random(self, preset):
        # "words": a preset's own vocabulary besides the common words (the demo model's "shapes")
        tokenizer = build_word_tokenizer(COMMON_WORDS + ["user", "assistant", "system", *preset.get("words", [])],
                                         SPECIAL_TOKENS, CHAT_TEMPLATE)
        ids = tokenizer.convert_tokens_to_ids
        image = preset["image"]
        config = self.config_class(
            text_config={
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": ids("<|im_end|>"),
                "pad_token_id": tokenizer.pad_token_id,
                **preset["text_config"],
            },
            vision_config={"patch_size": image["patch"], "spatial_merge_size": image["merge"],
                           "temporal_patch_size": 2, "hidden_size": preset["text_config"]["hidden_size"],
                           **preset["vision_config"]},
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
        factor = image["patch"] * image["merge"]
        processor = self.processor_class(
            image_processor=Qwen2VLImageProcessorPil(
                min_pixels=image["min_cells"] * factor * factor,
                max_pixels=image["max_cells"] * factor * factor,
                patch_size=image["patch"],
                merge_size=image["merge"],
                temporal_patch_size=2,
            ),
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
        )
        model = seeded_model(self.model_class, config, preset.get("seed", 0))
        # an untrained model could write image-layout tokens, which would break the replay of its answer
        model.generation_config.suppress_tokens = ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                       "<|vision_end|>"])
        return model, processor
