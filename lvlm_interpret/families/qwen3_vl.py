"""Qwen3-VL layout: Qwen2-VL's merged-patch grid (16-pixel patches, 2x2 merge, `image_grid_thw`).

The tower keeps the processor's patch order (no windows) and also feeds "DeepStack" features of some of its blocks
into the first LM layers at the image positions; vision relevancy follows the tower's blocks up to its final merger.
"""

from __future__ import annotations

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

from .qwen2_vl import Qwen2VLFamily, image_only_processor


class Qwen3VLFamily(Qwen2VLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    config_class = Qwen3VLConfig
    model_class = Qwen3VLForConditionalGeneration
    processor_class = image_only_processor(Qwen3VLProcessor)
