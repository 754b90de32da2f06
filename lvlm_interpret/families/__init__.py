"""Model-family adapters, found by the checkpoint config's `model_type`. A new family is one file plus one line here."""

from __future__ import annotations

from .base import ImageLayout, ModelFamily
from .idefics3 import Idefics3Family, SmolVLMFamily
from .llava import LlavaFamily
from .llava_next import LlavaNextFamily
from .llava_onevision import LlavaOnevisionFamily
from .qwen2_vl import Qwen2VLFamily
from .qwen2_5_vl import Qwen2_5VLFamily
from .qwen3_vl import Qwen3VLFamily
from .gemma3 import Gemma3Family
from .paligemma import PaliGemmaFamily
from .mistral3 import Mistral3Family
from .internvl import InternVLFamily

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (
    LlavaFamily(),
    LlavaNextFamily(),
    LlavaOnevisionFamily(),
    Idefics3Family(),
    SmolVLMFamily(),
    Qwen2VLFamily(),
    Qwen2_5VLFamily(),
    Qwen3VLFamily(),
    Gemma3Family(),
    PaliGemmaFamily(),
    Mistral3Family(),
    InternVLFamily(),
)}


def family_for_model_type(model_type: str) -> ModelFamily:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for family in FAMILIES.values() for t in family.model_types)
    raise KeyError(f"model type {model_type!r} has no adapter; supported model types: {', '.join(supported)}")


__all__ = ["FAMILIES", "ImageLayout", "ModelFamily", "family_for_model_type"]
