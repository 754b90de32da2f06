"""The Trace: everything one generation recorded, and the only input the explanation methods read.

Positions follow the expanded `input_ids`: the prompt fills [0, prompt_length), answer token t sits at
prompt_length + t and is predicted from position `prompt_length - 1 + t` (its "source" position).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import notebook
from .errors import UserInputError
from .families.base import ImageLayout

FORMAT_VERSION = 1
_METADATA_KEY = "lvlm_interpret.trace"
_INPUT_PREFIX = "inputs."
_PIXELS_PREFIX = "pixels."


class AnswerPositions:
    """Where the answer's tokens sit in the sequence: shared by a Trace and a front end's view of one."""

    prompt_length: int
    n_answer: int

    def source_position(self, token_index: int) -> int:
        """The position whose logits predict answer token `token_index`."""
        self.check_token_index(token_index)
        return self.prompt_length - 1 + token_index

    def check_token_index(self, token_index: int) -> None:
        if not 0 <= token_index < self.n_answer:
            raise UserInputError(
                f"answer token index {token_index} is out of range: the answer has {self.n_answer} tokens "
                f"(valid indices 0..{self.n_answer - 1})"
            )


@dataclass
class Trace(AnswerPositions):
    model_name: str
    prompt: str
    answer: str  # the decoded answer, special tokens removed
    input_ids: torch.Tensor  # [prompt_length + n_answer] int64, the final sequence
    prompt_length: int
    token_texts: list[str]  # the text of every position's token, decoded one token at a time
    images: list[ImageLayout]
    # attention[t, layer, head, k]: the source row of answer token t over keys k <= source(t), zero beyond.
    attention: torch.Tensor  # [n_answer, layers, heads, prompt_length + n_answer - 1] float16
    hidden: torch.Tensor  # [prompt_length + n_answer - 1, d] float16: last-layer states after the final norm
    answer_logprobs: torch.Tensor  # [n_answer] float32: log p(y_t) from the raw logits
    model_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel values etc., to re-run the model
    pixels: list[torch.Tensor] = field(default_factory=list)  # the original images, uint8 [height, width, 3]
    generation: dict = field(default_factory=dict)  # the options the answer was generated with
    special_token_ids: list[int] = field(default_factory=list)
    # an SAE feature edit the answer was generated with (lvlm_interpret.sae.FeatureEdit.to_json and its hook_name)
    feature_edit: dict | None = None

    # --- views ----------------------------------------------------------------------------------------
    @property
    def n_answer(self) -> int:
        return int(self.input_ids.shape[0]) - self.prompt_length

    @property
    def answer_ids(self) -> list[int]:
        return self.input_ids[self.prompt_length:].tolist()

    @property
    def answer_texts(self) -> list[str]:
        return self.token_texts[self.prompt_length:]

    @property
    def n_layers(self) -> int:
        return int(self.attention.shape[1])

    @property
    def n_heads(self) -> int:
        return int(self.attention.shape[2])

    def image(self, index: int = 0) -> Image.Image:
        """The original image `index` as the model saw it before processing."""
        return Image.fromarray(self.pixels[index].numpy(), mode="RGB")

    @property
    def nbytes(self) -> int:
        tensors = [self.input_ids, self.attention, self.hidden, self.answer_logprobs, *self.model_inputs.values(),
                   *self.pixels]
        return sum(t.numel() * t.element_size() for t in tensors) + len(json.dumps(self._metadata()))

    # --- notebook displays --------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return notebook.trace_repr(self)

    def _repr_html_(self) -> str:
        return notebook.trace_html(self)

    # --- persistence ------------------------------------------------------------------------------------
    def _metadata(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "prompt": self.prompt,
            "answer": self.answer,
            "prompt_length": self.prompt_length,
            "token_texts": self.token_texts,
            "images": [layout.to_json() for layout in self.images],
            "generation": self.generation,
            "special_token_ids": self.special_token_ids,
            "feature_edit": self.feature_edit,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trace to one safetensors file (tensors + JSON metadata), atomically."""
        path = Path(path)
        tensors = {
            "input_ids": self.input_ids,
            "attention": self.attention,
            "hidden": self.hidden,
            "answer_logprobs": self.answer_logprobs,
            **{_INPUT_PREFIX + name: value for name, value in self.model_inputs.items()},
            **{f"{_PIXELS_PREFIX}{index}": value for index, value in enumerate(self.pixels)},
        }
        tensors = {name: value.contiguous() for name, value in tensors.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".trace-", suffix=".tmp")
        os.close(handle)
        try:
            save_file(tensors, temp_name, metadata={_METADATA_KEY: json.dumps(self._metadata())})
            os.replace(temp_name, path)
        finally:
            if os.path.exists(temp_name):
                os.unlink(temp_name)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads(handle.metadata()[_METADATA_KEY])
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: trace format {metadata.get('format_version')} is not {FORMAT_VERSION}")
        tensors = load_file(str(path))
        return cls(
            model_name=metadata["model_name"],
            prompt=metadata["prompt"],
            answer=metadata["answer"],
            input_ids=tensors.pop("input_ids"),
            prompt_length=metadata["prompt_length"],
            token_texts=metadata["token_texts"],
            images=[ImageLayout.from_json(layout) for layout in metadata["images"]],
            attention=tensors.pop("attention"),
            hidden=tensors.pop("hidden"),
            answer_logprobs=tensors.pop("answer_logprobs"),
            model_inputs={name[len(_INPUT_PREFIX):]: value for name, value in tensors.items()
                          if name.startswith(_INPUT_PREFIX)},
            pixels=[tensors[f"{_PIXELS_PREFIX}{index}"] for index in range(len(metadata["images"]))],
            generation=metadata["generation"],
            special_token_ids=metadata["special_token_ids"],
            feature_edit=metadata.get("feature_edit"),
        )
