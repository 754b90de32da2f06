"""LLaVA-1.5 layout: one run of image tokens per image, a square patch grid of the (padded, resized, cropped) image."""

from __future__ import annotations

import numpy as np
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from ..models.word_tokenizer import COMMON_WORDS, build_word_tokenizer
from .base import ModelFamily, VisionTokens, seeded_model

IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _dim(size, key: str):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def processed_box(width: int, height: int, image_processor) -> tuple[float, float, float, float]:
    """The region of the original image that survives the processor's pad-to-square, resize and centre crop."""
    x0, y0, w, h = 0.0, 0.0, float(width), float(height)
    if getattr(image_processor, "do_pad", False) and w != h:
        side = max(w, h)
        x0, y0, w, h = x0 - (side - w) / 2, y0 - (side - h) / 2, side, side
    if not getattr(image_processor, "do_center_crop", False):
        return (x0, y0, x0 + w, y0 + h)
    size = image_processor.size
    if getattr(image_processor, "do_resize", True) and _dim(size, "shortest_edge"):
        scale_x = scale_y = _dim(size, "shortest_edge") / min(w, h)
    elif getattr(image_processor, "do_resize", True) and _dim(size, "height"):
        scale_x, scale_y = _dim(size, "width") / w, _dim(size, "height") / h
    else:
        scale_x = scale_y = 1.0
    crop_w = min(_dim(image_processor.crop_size, "width") / scale_x, w)
    crop_h = min(_dim(image_processor.crop_size, "height") / scale_y, h)
    cx, cy = x0 + w / 2, y0 + h / 2
    return (cx - crop_w / 2, cy - crop_h / 2, cx + crop_w / 2, cy + crop_h / 2)


class LlavaFamily(ModelFamily):
    name = "llava"
    model_types = ("llava",)

    def grids(self, model, processor, inputs, images):
        patch = model.config.vision_config.patch_size
        height, width = inputs["pixel_values"].shape[-2:]
        # The "full" strategy keeps the CLS feature as one extra image token in front of the grid.
        skip = 1 if model.config.vision_feature_select_strategy == "full" else 0
        return [
            (height // patch, width // patch, skip, processed_box(*image.size, processor.image_processor))
            for image in images
        ]

    def vision_layers(self, model):
        tower = model.model.vision_tower
        return list(getattr(tower, "vision_model", tower).encoder.layers)

    def vision_tokens(self, model, layout):
        # vision token 0 is CLS; grid token i is patch i, i.e. vision token i + 1
        return VisionTokens.one_sequence(np.arange(1, layout.n_cells + 1).reshape(-1, 1), layout.n_cells + 1,
                                         has_cls=True)

    def build_random(self, preset):
        tokenizer = build_word_tokenizer(COMMON_WORDS + ["user", "assistant"], [IMAGE_TOKEN], CHAT_TEMPLATE)
        image = preset["image"]
        config = llava_config(tokenizer, image["crop"], image["patch"], preset["vision_config"],
                              preset["text_config"])
        processor = llava_processor(tokenizer, image["crop"], image["patch"], centre_crop=True)
        model = seeded_model(LlavaForConditionalGeneration, config, preset.get("seed", 0))
        # an untrained model could write <image>, which would break the replay of its answer
        model.generation_config.suppress_tokens = [config.image_token_id]
        return model, processor


def llava_config(tokenizer, image_size: int, patch: int, vision_config: dict, text_config: dict,
                 vision_feature_layer: int = -2, config_class=LlavaConfig, vision_config_class=CLIPVisionConfig,
                 select_strategy: str = "default", **extra) -> LlavaConfig:
    """A LLaVA-style config (CLIP tower + Llama decoder) whose token ids come from `tokenizer`; `config_class` and
    `extra` give the LLaVA-NeXT variants, `vision_config_class` another tower (SigLIP, kept whole: "full")."""
    return config_class(
        vision_config=vision_config_class(image_size=image_size, patch_size=patch, **vision_config),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text_config,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=select_strategy,
        **extra,
    )


def llava_processor(tokenizer, image_size: int, patch: int, centre_crop: bool) -> LlavaProcessor:
    """LLaVA-1.5's processing (shortest-edge resize + centre crop) or a plain resize of the whole image."""
    size = {"shortest_edge": image_size} if centre_crop else {"height": image_size, "width": image_size}
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size=size, crop_size={"height": image_size, "width": image_size},
                                              do_center_crop=centre_crop),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
