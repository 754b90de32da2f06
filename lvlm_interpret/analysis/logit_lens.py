"""Logit lens on visual tokens: the final norm and the LM head applied to every layer's residual stream at every
image position, giving the top-k vocabulary tokens of each patch at each layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import notebook
from ..errors import UserInputError
from ..trace import Trace
from .hooks import run_with_cache


@dataclass
class LogitLens:
    layers: list[int]
    rows: int
    cols: int
    token_ids: np.ndarray  # [layers, rows * cols, k] int64, best first
    probs: np.ndarray  # [layers, rows * cols, k] float32
    texts: list[list[list[str]]]  # [layer][cell][rank]

    def __repr__(self) -> str:
        return notebook.logit_lens_repr(self)

    def _repr_html_(self) -> str:
        return notebook.logit_lens_html(self)

    def cell(self, layer_slot: int, row: int, col: int) -> list[tuple[str, float]]:
        index = row * self.cols + col
        return list(zip(self.texts[layer_slot][index], self.probs[layer_slot, index].tolist()))

    def to_json(self) -> dict:
        return {"layers": self.layers, "grid": [self.rows, self.cols],
                "top_k": [[[{"token": text, "id": int(i), "prob": round(float(p), 6)}
                            for text, i, p in zip(texts, ids, probs)]
                           for texts, ids, probs in zip(layer_texts, layer_ids, layer_probs)]
                          for layer_texts, layer_ids, layer_probs in zip(self.texts, self.token_ids, self.probs)]}

    @classmethod
    def from_json(cls, data: dict) -> "LogitLens":
        top_k = data["top_k"]
        return cls(layers=list(data["layers"]), rows=data["grid"][0], cols=data["grid"][1],
                   token_ids=np.asarray([[[e["id"] for e in cell] for cell in layer] for layer in top_k],
                                        dtype=np.int64).reshape(len(top_k), -1, len(top_k[0][0])),
                   probs=np.asarray([[[e["prob"] for e in cell] for cell in layer] for layer in top_k],
                                    dtype=np.float32).reshape(len(top_k), -1, len(top_k[0][0])),
                   texts=[[[e["token"] for e in cell] for cell in layer] for layer in top_k])


@torch.no_grad()
def logit_lens(loaded, trace: Trace, k: int = 5, layers: list[int] | None = None, image_index: int = 0) -> LogitLens:
    """Top-k tokens per patch of image `image_index` after each of `layers` (default: all); the last layer's
    projection is the model's own next-token distribution at those positions."""
    n_layers = len(loaded.family.language_layers(loaded.model))
    layers = list(range(n_layers)) if layers is None else list(layers)
    if not layers or any(not 0 <= layer < n_layers for layer in layers):
        raise UserInputError(f"logit-lens layers must lie in 0..{n_layers - 1}, got {layers}")
    vocabulary = loaded.model.config.get_text_config().vocab_size
    if not 1 <= k <= min(vocabulary, 100):
        raise UserInputError(f"k must be between 1 and {min(vocabulary, 100)}, got {k}")
    if not 0 <= image_index < len(trace.images):
        raise UserInputError(f"image index {image_index} is out of range: the request has {len(trace.images)} images")
    layout = trace.images[image_index]
    names = [f"lm.blocks.{layer}.hook_resid_post" for layer in layers]
    _, cache = run_with_cache(loaded, trace, names)
    norm, head = loaded.family.final_norm(loaded.model), loaded.family.lm_head(loaded.model)
    residuals = torch.stack([cache[name][0, layout.positions.ravel()] for name in names])  # [layers, cells, d]
    probs = torch.softmax(head(norm(residuals)).float(), dim=-1)
    top = probs.topk(k, dim=-1)
    ids = top.indices.cpu().numpy()
    tokenizer = loaded.processor.tokenizer
    flat = tokenizer.batch_decode(ids.reshape(-1, 1))
    per_cell = [flat[i:i + k] for i in range(0, len(flat), k)]
    texts = [per_cell[i:i + layout.n_cells] for i in range(0, len(per_cell), layout.n_cells)]
    return LogitLens(layers, layout.rows, layout.cols, ids, top.values.cpu().numpy().astype(np.float32), texts)
