"""Saving and loading SAEs in SAELens' folder format: cfg.json + sae_weights.safetensors.

cfg.json is SAELens 6's flat config (architecture, d_in, d_sae, dtype, apply_b_dec_to_input,
normalize_activations, k and rescale_acts_by_decoder_norm for top-k) with a `metadata` object (model_name,
hook_name and what this package records: the token set, the grid readout, the input normalisation, seed, dataset,
command). Folders written by SAELens itself load by path, and so do pre-6.0 configs (activation_fn_str /
activation_fn_kwargs, model_name and hook_name at the top level). The safetensors file carries the same metadata
as strings."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserInputError
from ..resources import ASSETS_DIR
from .model import SparseAutoencoder, architecture_name

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
METRICS_FILE = "metrics.json"
DEMO_SAE_DIR = ASSETS_DIR / "demo-sae"  # LM layer 2: one feature per colour and shape (AUROC >= 0.95)
DEMO_STEER_SAE_DIR = ASSETS_DIR / "demo-sae-steer"  # LM layer 0: early enough that editing it changes answers
SAE_NAMES = {"demo": DEMO_SAE_DIR, "demo-steer": DEMO_STEER_SAE_DIR}


def sae_config(sae: SparseAutoencoder, metadata: dict) -> dict:
    config = {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32",
              "device": "cpu", "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
              "reshape_activations": "none", "metadata": dict(metadata)}
    if sae.architecture == "topk":
        config.update(k=sae.k, rescale_acts_by_decoder_norm=sae.rescale_acts_by_decoder_norm)
    return config


def save_sae(sae: SparseAutoencoder, folder, metadata: dict) -> Path:
    """Write cfg.json and sae_weights.safetensors into `folder` (created). `metadata` needs model_name and
    hook_name; every entry is also stored, as text, in the safetensors header."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().to(torch.float32).contiguous().cpu() for name, value in sae.state_dict().items()}
    header = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata=header)
    (folder / CFG_FILE).write_text(json.dumps(sae_config(sae, metadata), indent=2))
    return folder


def resolve_sae_path(name_or_path) -> Path:
    """A shipped SAE's name (SAE_NAMES: `demo`, `demo-steer`) or a folder holding cfg.json and
    sae_weights.safetensors."""
    folder = SAE_NAMES.get(str(name_or_path), Path(name_or_path))
    if not folder.is_dir():
        raise UserInputError(f"--sae {name_or_path}: no such folder; give {' or '.join(f'`{n}`' for n in SAE_NAMES)} "
                             f"or a folder with {CFG_FILE} and {WEIGHTS_FILE} (SAELens format, e.g. written by "
                             "`sae train --out`)")
    for needed in (CFG_FILE, WEIGHTS_FILE):
        if not (folder / needed).is_file():
            raise UserInputError(f"--sae {name_or_path}: the folder has no {needed}; an SAE folder holds {CFG_FILE} "
                                 f"and {WEIGHTS_FILE} (SAELens format)")
    return folder


def _architecture(config: dict) -> str:
    if "architecture" in config:
        name = config["architecture"]
    else:  # pre-6.0 configs name the activation
        name = "topk" if config.get("activation_fn_str") == "topk" else "standard"
    if name == "gated":
        raise UserInputError("gated SAEs are not supported: use a standard (relu), topk or jumprelu SAE")
    return architecture_name(name)


def load_sae(name_or_path) -> tuple[SparseAutoencoder, dict]:
    """(sae, cfg) from a SAELens folder; cfg["metadata"] holds model_name and hook_name in either version."""
    folder = resolve_sae_path(name_or_path)
    try:
        config = json.loads((folder / CFG_FILE).read_text())
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (ValueError, SafetensorError) as error:
        raise UserInputError(f"--sae {name_or_path}: unreadable SAE files ({error})") from None
    metadata = dict(config.get("metadata") or {})
    for key in ("model_name", "hook_name"):  # pre-6.0: top level
        metadata.setdefault(key, config.get(key))
    config["metadata"] = metadata
    if config.get("normalize_activations", "none") not in ("none", None):
        raise UserInputError(f"--sae {name_or_path}: normalize_activations={config['normalize_activations']!r} is "
                             "not supported: fold the scaling into the weights (SAELens: "
                             "fold_activation_norm_scaling_factor) and save with normalize_activations none")
    k = config.get("k", (config.get("activation_fn_kwargs") or {}).get("k", 1))
    try:
        sae = SparseAutoencoder(int(config["d_in"]), int(config["d_sae"]), _architecture(config), k=int(k),
                                apply_b_dec_to_input=bool(config.get("apply_b_dec_to_input", True)),
                                rescale_acts_by_decoder_norm=bool(config.get("rescale_acts_by_decoder_norm", False)))
        sae.load_state_dict({name: value.float() for name, value in tensors.items()
                             if name in sae.state_dict()}, strict=True)
    except (KeyError, RuntimeError) as error:
        raise UserInputError(f"--sae {name_or_path}: the weights do not match cfg.json ({error})") from None
    return sae.eval(), config
