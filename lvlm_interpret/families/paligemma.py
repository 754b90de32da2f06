"""PaliGemma layout: image tokens first (one SigLIP patch per token, no pooling), then BOS, the prompt and a newline.

The prompt (image tokens and text, token_type_ids 0) is a prefix that attends bidirectionally; answer tokens are the
causal suffix (token_type_ids 1), which replays of the trace must keep (`answer_input_values`).
"""

from __future__ import annotations

import numpy as np
from transformers import (
    Gemma2Config,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from ..models.word_tokenizer import COMMON_WORDS, build_word_tokenizer
from .base import ModelFamily, VisionTokens, seeded_model
from .gemma3 import Gemma3Family

IMAGE_TOKEN = "<image>"
TEXT_CONFIGS = {"gemma": GemmaConfig, "gemma2": Gemma2Config}  # PaliGemma, PaliGemma 2 (soft-capped logits)
# PaliGemma has no chat format: images, then the prompt (the processor adds BOS after the last image and "\n").
CHAT_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endfor %}"
)


class PaliGemmaFamily(ModelFamily):
    name = "paligemma"
    model_types = ("paligemma",)
    answer_input_values = {"token_type_ids": 1}  # generated tokens join the causal suffix
    vision_layers = Gemma3Family.vision_layers

    def grids(self, model, processor, inputs, images):
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        # a plain resize of the whole image to the tower's square: the grid covers all of it
        return [(side, side, 0, (0.0, 0.0, float(image.width), float(image.height))) for image in images]

    def vision_tokens(self, model, layout):
        # LM token i is the projection of patch i; SigLIP has no CLS token: all rows summarise the image
        return VisionTokens.one_sequence(np.arange(layout.n_cells).reshape(-1, 1), layout.n_cells, has_cls=False)

    def load_processor(self, source, trust_remote_code=False):
        processor = super().load_processor(source, trust_remote_code=trust_remote_code)
        if not getattr(processor, "chat_template", None):
            processor.chat_template = CHAT_TEMPLATE
        return processor

    def build_random(self, preset):
        tokenizer = build_word_tokenizer(COMMON_WORDS, [IMAGE_TOKEN], CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
        image = preset["image"]
        image_processor = SiglipImageProcessorPil(size={"height": image["size"], "width": image["size"]})
        image_processor.image_seq_length = (image["size"] // image["patch"]) ** 2
        # the processor adds PaliGemma's <loc....> and <seg...> tokens to the tokenizer: size the vocabulary after it
        processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                       chat_template=CHAT_TEMPLATE)
        config = PaliGemmaConfig(
            vision_config=SiglipVisionConfig(image_size=image["size"], patch_size=image["patch"],
                                             vision_use_head=False, **preset["vision_config"]),
            text_config=TEXT_CONFIGS[preset.get("text_model", "gemma")](
                vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **preset["text_config"]),
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            vocab_size=len(tokenizer),
            projection_dim=preset["text_config"]["hidden_size"],
            hidden_size=preset["text_config"]["hidden_size"],
        )
        return seeded_model(PaliGemmaForConditionalGeneration, config, preset.get("seed", 0)), processor
