"""Qwen2.5-VL layout: Qwen2-VL's merged-patch grid; the vision tower runs windowed attention on window-ordered patches.

The LM side (image_grid_thw, 2x2 merge, mRoPE) is Qwen2-VL's. The tower differs: it permutes the merge groups
window by window (`get_vision_window_index`) and only the blocks in `fullatt_block_indexes` attend over the whole
image; the others attend inside windows of `window_size` pixels (one attention call per window, which vision
relevancy reads as blocks of the tower's sequence). The vision token groups follow the permutation.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.vision_utils import get_vision_window_index

from .base import VisionTokens
from .qwen2_vl import Qwen2VLFamily, image_only_processor


class Qwen2_5VLFamily(Qwen2VLFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    config_class = Qwen2_5_VLConfig
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = image_only_processor(Qwen2_5_VLProcessor)

    def vision_tokens(self, model, layout):
        # The tower's sequence holds merge group window_index[j] at slot j; LM token i is group i.
        config = model.config.vision_config
        merge = config.spatial_merge_size
        grid = torch.tensor([[1, layout.rows * merge, layout.cols * merge]])
        window_index, _ = get_vision_window_index(grid, merge, config.window_size, config.patch_size)
        slot = torch.argsort(window_index).numpy()
        groups = slot[:, None] * merge * merge + np.arange(merge * merge)
        return VisionTokens.one_sequence(groups, groups.size, has_cls=False)
