"""LLaVA-OneVision layout: LLaVA-NeXT's base view + unpadded stitched tiles with a newline per row, except that a
stitched grid larger than `anyres_max_N` tiles' worth of cells is bilinearly shrunk (the grid keeps its box; each
cell then mixes neighbouring patches)."""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import (
    LlavaOnevisionConfig,
    SiglipVisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
)

from ..models.word_tokenizer import COMMON_WORDS, build_word_tokenizer
from .base import seeded_model
from .llava import CHAT_TEMPLATE, IMAGE_TOKEN, llava_config
from .llava_next import LlavaNextFamily, stitched_grid


class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor without its video processor, which needs torchvision (absent from CPU installs);
    its own settings are named so that save_pretrained / from_pretrained keep them."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio,
                         **kwargs)


class LlavaOnevisionFamily(LlavaNextFamily):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    # SigLIP towers have no CLS: the real checkpoints keep every patch ("full"); a CLIP tower drops its CLS
    feature_strategies = ("default", "full")

    def high_resolution_grid(self, config, height, width, side):
        grid = stitched_grid(height, width, config.image_grid_pinpoints, config.vision_config.image_size, side)
        # the same shrink as the model's pack_image_features
        max_tiles = int(config.vision_aspect_ratio.strip("anyres_max_"))
        ratio = math.sqrt(grid.rows * grid.cols / (max_tiles * side * side))
        if ratio > 1.1:
            grid = grid._replace(rows=int(grid.rows // ratio), cols=int(grid.cols // ratio))
        return grid

    def cells_of_stitched_grid(self, tokens, layout):
        if tokens.shape == (layout.rows, layout.cols):
            return tokens.reshape(-1, 1), None
        # a shrunk cell is the model's bilinear mix of stitched cells: the same interpolation of one-hot grids gives
        # each cell's sources and shares
        n = tokens.size
        one_hot = torch.eye(n).reshape(n, 1, *tokens.shape)
        mix = torch.nn.functional.interpolate(one_hot, [layout.rows, layout.cols], mode="bilinear")
        mix = mix.reshape(n, -1).T.numpy()  # [cells, stitched cells]
        k = int((mix > 0).sum(1).max())
        sources = np.argsort(-mix, axis=1)[:, :k]
        weights = np.take_along_axis(mix, sources, axis=1)
        return tokens.reshape(-1)[sources], weights / weights.sum(1, keepdims=True)

    def load_processor(self, source, trust_remote_code=False):
        return LlavaOnevisionImageOnlyProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)

    def build_random(self, preset):
        # the processor counts <video> tokens: it must be a token of its own, not <unk>
        tokenizer = build_word_tokenizer(COMMON_WORDS + ["user", "assistant"], [IMAGE_TOKEN, "<video>"],
                                         CHAT_TEMPLATE)
        image = preset["image"]
        tile, patch, pinpoints = image["tile"], image["patch"], image["pinpoints"]
        aspect = f"anyres_max_{image['max_tiles']}"
        # the real checkpoints' SigLIP tower (no CLS, every patch kept: "full", its last layer), or a CLIP one
        # whose CLS the "default" strategy drops
        siglip = preset.get("tower") == "siglip"
        strategy = "full" if siglip else "default"
        config = llava_config(tokenizer, tile, patch, preset["vision_config"], preset["text_config"],
                              config_class=LlavaOnevisionConfig, image_grid_pinpoints=pinpoints,
                              vision_aspect_ratio=aspect, select_strategy=strategy,
                              **({"vision_config_class": SiglipVisionConfig, "vision_feature_layer": -1}
                                 if siglip else {}))
        processor = LlavaOnevisionImageOnlyProcessor(
            image_processor=LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile},
                                                            image_grid_pinpoints=pinpoints),
            tokenizer=tokenizer,
            num_image_tokens=(tile // patch) ** 2 + (not siglip),
            vision_feature_select_strategy=strategy,
            vision_aspect_ratio=aspect,
            chat_template=CHAT_TEMPLATE,
        )
        model = seeded_model(LlavaOnevisionForConditionalGeneration, config, preset.get("seed", 0))
        # an untrained model could write <image>, which would break the replay of its answer
        model.generation_config.suppress_tokens = [config.image_token_id]
        return model, processor
