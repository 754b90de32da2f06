"""Sparse autoencoders with SAELens 6's tensor names, orientation and forward definitions.

    pre   = (x - b_dec * apply_b_dec_to_input) W_enc + b_enc      W_enc [d_in, d_sae], b_enc [d_sae]
    f     = relu(pre)                          architecture "standard" (ReLU, trained with an L1 penalty)
            relu of the k largest of pre, rest 0                    "topk"
            relu(pre) * 1[pre > threshold]                          "jumprelu" (loaded, not trained here)
    x_hat = f W_dec + b_dec                                         W_dec [d_sae, d_in], b_dec [d_in]

With `rescale_acts_by_decoder_norm` (SAELens' top-k option) pre is multiplied by ||W_dec,i|| before the top-k and f
divided by it again before decoding. Any input scaling used in training is folded into the weights before saving,
so a saved SAE reads the hook's raw activations.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserInputError

ARCHITECTURES = ("topk", "standard")  # trainable here; "jumprelu" loads for inference
ARCHITECTURE_ALIASES = {"relu": "standard"}


def architecture_name(name: str) -> str:
    """The SAELens name of an architecture given on the command line (relu is SAELens' "standard")."""
    name = ARCHITECTURE_ALIASES.get(name, name)
    if name not in (*ARCHITECTURES, "jumprelu"):
        raise UserInputError(f"unknown SAE architecture {name!r}: use topk or relu (standard)"
                             " (jumprelu SAEs trained elsewhere load by path)")
    return name


class SparseAutoencoder(nn.Module):
    def __init__(self, d_in: int, d_sae: int, architecture: str = "topk", k: int = 32,
                 apply_b_dec_to_input: bool = True, rescale_acts_by_decoder_norm: bool = False):
        super().__init__()
        self.architecture = architecture_name(architecture)
        if d_in < 1 or d_sae < 1:
            raise UserInputError(f"an SAE needs d_in and d_sae of at least 1, got {d_in} and {d_sae}")
        if self.architecture == "topk" and not 1 <= k <= d_sae:
            raise UserInputError(f"k must lie between 1 and the number of features ({d_sae}), got {k}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.rescale_acts_by_decoder_norm = rescale_acts_by_decoder_norm
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if self.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))

    def initialise(self, generator: torch.Generator, decoder_norm: float = 0.1) -> None:
        """SAELens 6's start: decoder rows of norm `decoder_norm` in random directions, encoder their transpose."""
        with torch.no_grad():
            directions = torch.randn(self.d_sae, self.d_in, generator=generator)
            self.W_dec.copy_(directions / directions.norm(dim=-1, keepdim=True) * decoder_norm)
            self.W_enc.copy_(self.W_dec.T)
            self.b_enc.zero_()
            self.b_dec.zero_()

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def activation(self, pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        top = pre.topk(self.k if k is None else k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] of activations [..., d_in]."""
        return self.activation(self.pre_activation(x))

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        if self.rescale_acts_by_decoder_norm:
            features = features / self.W_dec.norm(dim=-1)
        return features @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on `scale * x` read x itself and give back x-sized reconstructions (as SAELens folds
        its activation norm scaling factor)."""
        if self.rescale_acts_by_decoder_norm or self.architecture == "jumprelu":
            raise ValueError("folding is for the SAEs trained here (standard / topk without decoder-norm rescaling)")
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.architecture == "topk" else ""
        return f"SparseAutoencoder({self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{k})"
