"""What every model family tells the rest of the product: where its image tokens are and how they tile the image.

A family adapter is the only code that knows a layout. Everything downstream works on `ImageLayout`s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn


@dataclass(frozen=True)
class ImageLayout:
    """One image's visual tokens: a `rows` x `cols` grid stored row-major from `start` in the expanded input_ids.

    `box` is the region (x0, y0, x1, y1) of the original image, in its pixels, that the grid covers after the
    processor's resize / crop / pad; it can lie partly outside the image where the processor pads.
    """

    start: int
    rows: int
    cols: int
    box: tuple[float, float, float, float]
    image_size: tuple[int, int]  # original (width, height)

    @property
    def n_tokens(self) -> int:
        return self.rows * self.cols

    @property
    def end(self) -> int:
        return self.start + self.n_tokens

    def to_json(self) -> dict:
        return {"start": self.start, "rows": self.rows, "cols": self.cols, "box": list(self.box),
                "image_size": list(self.image_size)}

    @classmethod
    def from_json(cls, data: dict) -> "ImageLayout":
        return cls(start=data["start"], rows=data["rows"], cols=data["cols"], box=tuple(data["box"]),
                   image_size=tuple(data["image_size"]))


class ModelFamily:
    """Base adapter. Subclasses set `name` and `model_types` and implement `grids` and `build_random`."""

    name: str = ""
    model_types: tuple[str, ...] = ()

    # --- image layout -------------------------------------------------------------------------------
    def image_layouts(self, model: nn.Module, processor, inputs, images: list[Image.Image]) -> list[ImageLayout]:
        """The layout of every image of a processed input (batch of one)."""
        image_token_id = self.image_token_id(model)
        positions = (inputs["input_ids"][0] == image_token_id).nonzero().flatten().tolist()
        grids = self.grids(model, processor, inputs, images)
        layouts, cursor = [], 0
        for (rows, cols, skip, box), image in zip(grids, images, strict=True):
            count = skip + rows * cols
            run = positions[cursor:cursor + count]
            if len(run) != count or run[-1] - run[0] != count - 1:
                raise RuntimeError(
                    f"{self.name}: expected {count} consecutive image tokens for image {len(layouts)}, "
                    f"found {len(run)} in input_ids"
                )
            layouts.append(ImageLayout(start=run[0] + skip, rows=rows, cols=cols, box=box, image_size=image.size))
            cursor += count
        if cursor != len(positions):
            raise RuntimeError(f"{self.name}: {len(positions) - cursor} image tokens in input_ids belong to no image")
        return layouts

    def image_token_id(self, model: nn.Module) -> int:
        return int(model.config.image_token_id)

    def grids(self, model, processor, inputs, images) -> list[tuple[int, int, int, tuple]]:
        """Per image: (rows, cols, tokens to skip before the grid, box in original pixels)."""
        raise NotImplementedError

    # --- module handles -------------------------------------------------------------------------------
    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def language_layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.language_model(model).layers)

    def language_attentions(self, model: nn.Module) -> list[nn.Module]:
        return [layer.self_attn for layer in self.language_layers(model)]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.language_model(model).norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def vision_layers(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def vision_attentions(self, model: nn.Module) -> list[nn.Module]:
        return [layer.self_attn for layer in self.vision_layers(model)]

    # --- how LM image tokens map onto the vision tower's tokens (for vision-side relevancy) ----------------
    vision_readout: str = "cls"  # the vision-tower row that summarises an image: "cls" (row 0) or "mean"

    def vision_token_groups(self, model: nn.Module, layout: ImageLayout) -> np.ndarray:
        """[n_tokens, k]: the vision-tower token indices (of that image) that make each LM image token."""
        raise NotImplementedError

    def load_processor(self, source: str, trust_remote_code: bool = False):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)

    # --- tiny random models for tests and benchmarks ------------------------------------------------------
    def build_random(self, preset: dict) -> tuple[nn.Module, object]:
        """A random-initialised model and a working offline processor from a preset in configs/."""
        raise NotImplementedError


def seeded_model(model_class, config, seed: int) -> nn.Module:
    """Build `model_class` from `config` with weights that depend only on `seed`."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_class(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
