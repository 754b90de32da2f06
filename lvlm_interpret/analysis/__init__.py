"""Analyses of how a model processes the image (Neo et al., ICLR 2025), built on string-named hook points:
mean / zero ablation of image tokens, attention knockout over layer windows, logit lens on visual tokens."""

from .ablation import ablate, load_mean_embedding, mean_visual_embedding, save_mean_embedding
from .hooks import hook_point_names, hooked, run_with_cache, run_with_hooks
from .knockout import WINDOWS, knockout, knockout_figure
from .logit_lens import logit_lens
from .token_sets import select_tokens

__all__ = ["WINDOWS", "ablate", "hook_point_names", "hooked", "knockout", "knockout_figure", "load_mean_embedding",
           "logit_lens", "mean_visual_embedding", "run_with_cache", "run_with_hooks", "save_mean_embedding",
           "select_tokens"]
