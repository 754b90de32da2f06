"""Mean ablation of image tokens at the language model's input (Neo et al., ICLR 2025).

The chosen image-token embeddings are replaced by the mean visual embedding over many images (which keeps
their norm in distribution) or by zeros; the answer is regenerated and the target token re-scored. Where a family
feeds image tokens to the LM by another path too (Qwen3-VL's DeepStack features), that is replaced as well: by its
mean over the image's tokens, or by zeros."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import notebook
from ..capture import GenerationOptions, build_inputs, generate_with_capture, scoped_hook
from ..errors import UserInputError
from ..images import load_image
from ..resources import EXAMPLES_DIR
from ..trace import Trace
from .hooks import hooked, run_with_cache, run_with_hooks

REPLACEMENTS = ("mean", "zero")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MEAN_KEY = "mean_embedding"


@torch.no_grad()
def mean_visual_embedding(loaded, images) -> tuple[torch.Tensor, int]:
    """The mean LM-input embedding over every image token of `images` (one forward each); (mean [d], tokens)."""
    total, count = None, 0
    for image in images:
        inputs = build_inputs(loaded, [image], "Describe the image.")  # image tokens do not depend on the text
        layout = loaded.family.image_layouts(loaded.model, loaded.processor, inputs, [image])[0]
        _, cache = run_with_cache(loaded, dict(inputs), ["lm.hook_embed"])
        tokens = cache["lm.hook_embed"][0, layout.cell_positions].double().cpu()
        total = tokens.sum(0) if total is None else total + tokens.sum(0)
        count += tokens.shape[0]
    if count == 0:
        raise UserInputError("no images given for the mean embedding")
    return (total / count).float(), count


def image_files(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"--images {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserInputError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return files


def mean_embedding_from_folder(loaded, folder) -> tuple[torch.Tensor, dict]:
    files = image_files(folder)
    mean, count = mean_visual_embedding(loaded, [load_image(path) for path in files])
    return mean, {"model": loaded.name, "n_images": str(len(files)), "n_tokens": str(count)}


_EXAMPLE_MEANS: dict[str, torch.Tensor] = {}
_EXAMPLE_MEANS_LOCK = threading.Lock()


def example_mean_embedding(loaded) -> torch.Tensor:
    """The mean embedding over the shipped example scenes (assets/examples), once per model: the web page's
    default when no mean file is given (representative for the demo model, a rough one for others)."""
    with _EXAMPLE_MEANS_LOCK:
        if loaded.name not in _EXAMPLE_MEANS:
            _EXAMPLE_MEANS[loaded.name] = mean_embedding_from_folder(loaded, EXAMPLES_DIR)[0]
        return _EXAMPLE_MEANS[loaded.name]


def save_mean_embedding(path, mean: torch.Tensor, metadata: dict) -> None:
    save_file({MEAN_KEY: mean.contiguous()}, str(path), metadata={k: str(v) for k, v in metadata.items()})


def load_mean_embedding(path, loaded) -> torch.Tensor:
    """A saved mean embedding, checked against the model's hidden size."""
    try:
        mean = load_file(str(path))[MEAN_KEY]
    except (OSError, SafetensorError, KeyError):
        raise UserInputError(f"cannot read a mean embedding from {path}: make one with "
                             "`python -m lvlm_interpret mean-embedding --images DIR --out FILE`") from None
    size = loaded.model.config.get_text_config().hidden_size
    if mean.shape != (size,):
        raise UserInputError(f"the mean embedding in {path} has shape {tuple(mean.shape)}, the model's hidden size "
                             f"is {size}: compute it with this model")
    return mean


def replace_embeddings(positions: list[int], value: torch.Tensor):
    """A `lm.hook_embed` hook that writes `value` ([d]) at `positions`. Only the forward that covers the
    positions is touched (under `generate`, the prompt's forward, not the one-token steps after it)."""
    def hook(embeds, name):
        if not positions or embeds.shape[1] <= max(positions):
            return None
        edited = embeds.clone()
        edited[:, positions] = value.to(edited.device, edited.dtype)
        return edited
    return hook


@contextlib.contextmanager
def side_inputs_masked(loaded, positions: list[int], images, zero: bool = False):
    """While active, the family's other image inputs to the LM (Qwen3-VL's DeepStack features) are masked at
    `positions` (see `ModelFamily.mask_image_side_inputs`); nothing for the other families."""
    family = loaded.family

    def hook(module, args, kwargs):
        edited = family.mask_image_side_inputs(kwargs, positions, images, zero=zero)
        return None if edited is kwargs else (args, edited)

    with scoped_hook(family.language_model(loaded.model), hook, pre=True):
        yield


@dataclass
class AblationResult:
    positions: list[int]
    replacement: str
    token_index: int
    target: str  # the answer token that is re-scored
    prob_before: float
    prob_after: float
    still_argmax: bool
    answer_before: str
    answer_after: str

    @property
    def answer_changed(self) -> bool:
        return self.answer_before != self.answer_after

    def __repr__(self) -> str:
        return notebook.ablation_repr(self)

    def _repr_html_(self) -> str:
        return notebook.ablation_html(self)

    def to_json(self) -> dict:
        return {**asdict(self), "answer_changed": self.answer_changed, "n_tokens": len(self.positions)}

    @classmethod
    def from_json(cls, data: dict) -> "AblationResult":
        return cls(**{k: v for k, v in data.items() if k not in ("answer_changed", "n_tokens")})


def _token_probability(logits: torch.Tensor, trace: Trace, token_index: int) -> tuple[float, bool]:
    row = logits[0, trace.source_position(token_index)].float()
    token = trace.answer_ids[token_index]
    return float(torch.softmax(row, -1)[token]), bool(row.argmax() == token)


def ablate(loaded, trace: Trace, positions: list[int], replacement: str = "mean", mean: torch.Tensor | None = None,
           token_index: int = 0, regenerate: bool = True) -> AblationResult:
    """Replace the embeddings at `positions` by `mean` (or zeros), re-score answer token `token_index`
    (teacher-forced on the original answer) and, with `regenerate`, generate the answer again."""
    trace.check_token_index(token_index)
    if replacement not in REPLACEMENTS:
        raise UserInputError(f"unknown replacement {replacement!r}: choose mean or zero")
    if replacement == "mean" and mean is None:
        raise UserInputError("mean ablation needs a mean embedding (mean-embedding command), or use zero ablation")
    if not positions:
        raise UserInputError("ablation needs a non-empty set of image-token positions")
    cells = {p for layout in trace.images for p in layout.cell_positions.tolist()}
    outside = sorted(set(positions) - cells)
    if outside:
        spans = ", ".join(f"{int(layout.cell_positions.min())}..{int(layout.cell_positions.max())}"
                          for layout in trace.images)
        raise UserInputError(f"ablation positions must be image-token positions (the image grid's cells, in "
                             f"{spans}); {outside[0]} is not one")
    size = loaded.model.config.get_text_config().hidden_size
    value = torch.zeros(size) if replacement == "zero" else mean
    hook = ("lm.hook_embed", replace_embeddings(sorted(positions), value))
    prob_before, _ = _token_probability(run_with_hooks(loaded, trace, []).logits, trace, token_index)
    images = [layout.cell_positions for layout in trace.images]
    with side_inputs_masked(loaded, sorted(positions), images, zero=replacement == "zero"):
        prob_after, still_argmax = _token_probability(run_with_hooks(loaded, trace, [hook]).logits, trace,
                                                      token_index)
        answer_after = trace.answer
        if regenerate:
            options = GenerationOptions(**trace.generation)
            with hooked(loaded, [hook]):
                answer_after = generate_with_capture(loaded, [trace.image(k) for k in range(len(trace.images))],
                                                     trace.prompt, options).answer
    return AblationResult(sorted(positions), replacement, token_index, trace.answer_texts[token_index], prob_before,
                          prob_after, still_argmax, trace.answer, answer_after)
