"""Loading a model by hub id, local path or `random:PRESET`, always through the same steps."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.utils import logging as hf_logging

from ..capture import CAPTURE_ATTENTION
from ..errors import UserInputError
from ..families import ModelFamily, family_for_model_type
from ..resources import ASSETS_DIR, CONFIGS_DIR

RANDOM_PREFIX = "random:"
# Models that ship with the product, by name, both trained by lvlm_interpret/demo/train.py on the same scenes:
# "demo" on LLaVA's architecture, "demo-qwen2_vl" on Qwen2-VL's (--family qwen2_vl)
BUILTIN_MODELS = {"demo": ASSETS_DIR / "demo-model", "demo-qwen2_vl": ASSETS_DIR / "demo-qwen2_vl"}
DEFAULT_MODEL = "demo"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def quiet_loading_logs() -> None:
    """For the command line and the page (not at import: a library leaves its user's logging alone): stderr
    carries one line per error, not transformers' loading bars and notices."""
    logging.getLogger("transformers.image_processing_utils").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    processor: object
    family: ModelFamily
    device: torch.device


def random_presets() -> list[str]:
    return sorted(path.stem[len("random-"):] for path in CONFIGS_DIR.glob("random-*.json"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UserInputError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {device!r} asked for, but no CUDA GPU is available: use --device cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 is the usual checkpoint dtype on GPUs; on CPUs float32 is the fast and exact choice.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserInputError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load `name`: `random:PRESET` (configs/random-PRESET.json), a local checkpoint folder or a hub id."""
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if name.startswith(RANDOM_PREFIX):
        model, processor, family = _build_random(name[len(RANDOM_PREFIX):], torch_dtype,
                                                 target if device_map is None else torch.device("cpu"))
    else:
        model, processor, family = _load_pretrained(name, torch_dtype, device_map, trust_remote_code)
    model.set_attn_implementation(CAPTURE_ATTENTION)
    if device_map is None:
        model = model.to(target)
    model.eval()
    return LoadedModel(name=name, model=model, processor=processor, family=family,
                       device=next(model.parameters()).device)


def _build_random(preset_name: str, dtype: torch.dtype = torch.float32, device=torch.device("cpu")):
    """Weights are made in `dtype` on `device`: a 7B-shaped preset never exists in float32 on the host."""
    path = CONFIGS_DIR / f"random-{preset_name}.json"
    if not path.is_file():
        raise UserInputError(
            f"unknown random preset {preset_name!r}: available are "
            f"{', '.join(RANDOM_PREFIX + p for p in random_presets())}"
        )
    preset = json.loads(path.read_text())
    family = _family(preset["family"])
    default_dtype = torch.get_default_dtype()
    if dtype != default_dtype:  # process-wide: only touched when a preset is built in another dtype
        torch.set_default_dtype(dtype)
    try:
        with device:
            model, processor = family.build_random(preset)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.to(dtype), processor, family


def _family(model_type: str) -> ModelFamily:
    try:
        return family_for_model_type(model_type)
    except KeyError as error:
        raise UserInputError(str(error.args[0])) from error


def _load_pretrained(name: str, torch_dtype, device_map, trust_remote_code: bool):
    local = BUILTIN_MODELS.get(name, Path(name).expanduser())
    if name in BUILTIN_MODELS and not local.is_dir():
        raise UserInputError(f"built-in model {name!r} is not installed: its folder {local} is missing (a checkout "
                             "or wheel without it); reinstall, or train it with python -m lvlm_interpret.demo.train")
    source = str(local) if local.is_dir() else name
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code,
                                            local_files_only=offline or local.is_dir())
    except (OSError, ValueError) as error:
        if "trust_remote_code" in str(error):
            raise UserInputError(f"model {name!r} needs its own Python code to load, and running a checkpoint's code "
                                 "is off: pass --trust-remote-code only for a checkpoint you trust") from None
        looked = f"local folder {local}" if local.is_dir() else \
            f"no local folder {name!r}, and hub id {name!r} is not in the Hugging Face cache" + \
            (" (offline: downloads are off)" if offline else " and could not be downloaded")
        raise UserInputError(f"cannot load model {name!r}: {looked}") from error
    family = _family(config.model_type)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source,
            dtype=torch_dtype,
            device_map=device_map,
            attn_implementation=CAPTURE_ATTENTION,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # pickle weights (.bin) can run code when loaded: never read them
        )
    except OSError as error:
        raise UserInputError(f"cannot load model {name!r}: it has no safetensors weights (*.safetensors), and "
                             "pickle weights (.bin) are never loaded: use a checkpoint saved as safetensors") from error
    processor = family.load_processor(source, trust_remote_code=trust_remote_code)
    return model, processor, family
