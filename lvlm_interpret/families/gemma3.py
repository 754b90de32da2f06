"""Gemma 3 layout: the whole image resized to a square, SigLIP patches average-pooled to a fixed grid of soft tokens.

Each image becomes `<start_of_image>`, `mm_tokens_per_image` (256: 16 x 16) soft tokens and `<end_of_image>`; the
projector average-pools the tower's P x P patch grid in k x k blocks (P = 64, k = 4 for the released checkpoints).
Pan-and-scan (extra crops of one image) is off by default in the processor and not supported here.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    SiglipVisionConfig,
)

from ..errors import UserInputError
from ..models.word_tokenizer import COMMON_WORDS, build_word_tokenizer
from .base import ModelFamily, VisionTokens, merged_patch_groups, seeded_model

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL_TOKENS = ["<start_of_turn>", "<end_of_turn>", BOI, EOI, SOFT]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class Gemma3Family(ModelFamily):
    name = "gemma3"
    model_types = ("gemma3",)

    def grids(self, model, processor, inputs, images):
        if inputs["pixel_values"].shape[0] != len(images):
            raise UserInputError("gemma3: pan-and-scan crops are not supported: turn pan-and-scan off in the "
                                 "processor (do_pan_and_scan=False, its default)")
        side = math.isqrt(model.config.mm_tokens_per_image)
        # a plain resize of the whole image (no crop, no pad): the grid covers all of it
        return [(side, side, 0, (0.0, 0.0, float(image.width), float(image.height))) for image in images]

    def vision_layers(self, model):
        tower = model.model.vision_tower
        return list(getattr(tower, "vision_model", tower).encoder.layers)

    def vision_tokens(self, model, layout):
        # cell (r, c) is the mean of the k x k patch block (r*k .. r*k+k-1, c*k .. c*k+k-1) of the P x P patch grid;
        # SigLIP has no CLS token: the image is summarised by all its rows
        vision = model.config.vision_config
        patches = vision.image_size // vision.patch_size
        groups = merged_patch_groups(layout.rows, layout.cols, patches // layout.rows)
        return VisionTokens.one_sequence(groups, patches * patches, has_cls=False)

    def build_random(self, preset):
        tokenizer = build_word_tokenizer(COMMON_WORDS + ["user", "model"], SPECIAL_TOKENS, CHAT_TEMPLATE,
                                         boi_token=BOI, eoi_token=EOI, image_token=SOFT)
        ids = tokenizer.convert_tokens_to_ids
        image = preset["image"]
        config = Gemma3Config(
            text_config={
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": ids("<end_of_turn>"),
                "pad_token_id": tokenizer.pad_token_id,
                **preset["text_config"],
            },
            vision_config=SiglipVisionConfig(image_size=image["size"], patch_size=image["patch"],
                                             **preset["vision_config"]),
            mm_tokens_per_image=image["tokens_per_side"] ** 2,
            boi_token_index=ids(BOI),
            eoi_token_index=ids(EOI),
            image_token_index=ids(SOFT),
        )
        processor = Gemma3Processor(
            image_processor=Gemma3ImageProcessorPil(size={"height": image["size"], "width": image["size"]},
                                                    do_pan_and_scan=False),
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
            image_seq_length=image["tokens_per_side"] ** 2,
        )
        model = seeded_model(Gemma3ForConditionalGeneration, config, preset.get("seed", 0))
        # Gemma 3 initialises the image projection to zeros, which would cut the image off from the LM
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        generator = torch.Generator().manual_seed(preset.get("seed", 0))
        with torch.no_grad():
            projection.copy_(torch.randn(projection.shape, generator=generator) * config.text_config.initializer_range)
        return model, processor
