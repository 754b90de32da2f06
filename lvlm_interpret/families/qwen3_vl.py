"""Qwen3-VL layout: Qwen2-VL's merged-patch grid (16-pixel patches, 2x2 merge, `image_grid_thw`).

The tower keeps the processor's patch order (no windows) and also feeds "DeepStack" features of some of its blocks
into the first LM layers at the image positions; vision relevancy follows the tower's blocks up to its final merger,
and masking an image token (CLEANN) replaces its DeepStack features too.
"""

from __future__ import annotations

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from .qwen2_vl import Qwen2VLFamily, image_only_processor


class Qwen3VLFamily(Qwen2VLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    config_class = Qwen3VLConfig
    model_class = Qwen3VLForConditionalGeneration
    processor_class = image_only_processor(Qwen3VLProcessor)

    def mask_image_side_inputs(self, decoder_kwargs, positions, images, zero=False):
        features, visual = decoder_kwargs.get("deepstack_visual_embeds"), decoder_kwargs.get("visual_pos_masks")
        if not features or visual is None:
            return decoder_kwargs
        visual = visual[0]
        row_of = torch.cumsum(visual.long(), 0) - 1  # each image position's row in the DeepStack features
        masked = set(positions)
        per_image = []  # (the image's rows, its masked rows)
        for cells in images:
            rows = [int(row_of[p]) for p in cells if p < visual.shape[0] and visual[p]]
            chosen = [int(row_of[p]) for p in cells if p in masked and p < visual.shape[0] and visual[p]]
            if chosen:
                per_image.append((rows, chosen))
        if not per_image:
            return decoder_kwargs
        edited = []
        for layer_features in features:
            layer_features = layer_features.clone()
            for rows, chosen in per_image:
                layer_features[chosen] = 0.0 if zero else layer_features[rows].mean(0)
            edited.append(layer_features)
        return {**decoder_kwargs, "deepstack_visual_embeds": edited}
