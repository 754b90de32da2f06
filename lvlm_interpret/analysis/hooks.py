"""String-named hook points on any supported family, in the style of TransformerLens.

Names (L counts from 0; `hook_point_names(loaded)` lists them for a model):

    lm.hook_embed                      the language model's input embeddings (image features already merged in)
    lm.blocks.{L}.hook_resid_pre       the residual stream entering decoder layer L
    lm.blocks.{L}.hook_resid_post      the residual stream leaving decoder layer L
    lm.blocks.{L}.hook_attn_out        the attention block's output (before it is added to the stream)
    lm.blocks.{L}.hook_mlp_out         the MLP's output
    lm.blocks.{L}.attn.hook_mask       the 4D mask the attention receives: bool (True = may attend) or additive
                                       float; the implicit causal mask is made explicit (bool) first
    lm.blocks.{L}.attn.hook_pattern    the attention probabilities [batch, heads, queries, keys] (read-only)
    lm.ln_final.hook_normalized        the final norm's output
    lm.hook_logits                     the LM head's output
    vision.blocks.{L}.hook_resid_pre / hook_resid_post / attn.hook_pattern   the same on the vision tower

Values keep the model's own shapes (a batch dimension for the LM; Qwen2-VL's tower runs on [tokens, d]).
A hook function is `fn(value, name)` and returns a replacement (a new tensor, not an in-place edit) or None.
Every hook rides on `capture.scoped_hook`, so it acts only on forwards run in the caller's context: concurrent
requests on the same model are untouched.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..capture import AttentionGraph, replay_inputs, scoped_hook
from ..errors import UserInputError
from ..trace import Trace

HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]

LM_BLOCK_POINTS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_mask",
                   "attn.hook_pattern")
VISION_BLOCK_POINTS = ("hook_resid_pre", "hook_resid_post", "attn.hook_pattern")
_BLOCK_NAME = re.compile(r"(lm|vision)\.blocks\.(\d+)\.(.+)")


@dataclass(frozen=True)
class HookPoint:
    """Where a named point lives: the input (`kind` "input": positional argument 0 or keyword `key`) or the
    output ("output") of `module`, or the attention probabilities of an attention module ("pattern")."""

    name: str
    module: torch.nn.Module
    kind: str
    key: str = ""


def hook_point_names(loaded) -> list[str]:
    family, model = loaded.family, loaded.model
    names = ["lm.hook_embed"]
    for layer in range(len(family.language_layers(model))):
        names += [f"lm.blocks.{layer}.{point}" for point in LM_BLOCK_POINTS]
    names += ["lm.ln_final.hook_normalized", "lm.hook_logits"]
    for layer in range(len(family.vision_layers(model))):
        names += [f"vision.blocks.{layer}.{point}" for point in VISION_BLOCK_POINTS]
    return names


def hook_point(loaded, name: str) -> HookPoint:
    """Resolve a name through the family adapter's module handles."""
    family, model = loaded.family, loaded.model
    fixed = {
        "lm.hook_embed": lambda: HookPoint(name, family.language_model(model), "input", "inputs_embeds"),
        "lm.ln_final.hook_normalized": lambda: HookPoint(name, family.final_norm(model), "output"),
        "lm.hook_logits": lambda: HookPoint(name, family.lm_head(model), "output"),
    }
    if name in fixed:
        return fixed[name]()
    match = _BLOCK_NAME.fullmatch(name)
    tower, point = (match.group(1), match.group(3)) if match else (None, None)
    if match is None or point not in (LM_BLOCK_POINTS if tower == "lm" else VISION_BLOCK_POINTS):
        raise UserInputError(f"unknown hook point {name!r}: names look like lm.hook_embed, "
                             f"lm.blocks.L.hook_resid_post, lm.blocks.L.attn.hook_mask or "
                             f"vision.blocks.L.hook_resid_post (see hook_point_names(model))")
    layers = family.language_layers(model) if tower == "lm" else family.vision_layers(model)
    attentions = family.language_attentions(model) if tower == "lm" else family.vision_attentions(model)
    layer = int(match.group(2))
    if layer >= len(layers):
        raise UserInputError(f"hook point {name!r}: layer {layer} is out of range, the {tower} part has "
                             f"{len(layers)} layers")
    if point == "hook_resid_pre":
        return HookPoint(name, layers[layer], "input", "hidden_states")
    if point == "hook_resid_post":
        return HookPoint(name, layers[layer], "output")
    if point == "hook_attn_out":
        return HookPoint(name, attentions[layer], "output")
    if point == "hook_mlp_out":
        if not hasattr(layers[layer], "mlp"):
            raise UserInputError(f"hook point {name!r}: this family's decoder layers have no `mlp` module")
        return HookPoint(name, layers[layer].mlp, "output")
    if point == "attn.hook_mask":
        return HookPoint(name, attentions[layer], "input", "attention_mask")
    return HookPoint(name, attentions[layer], "pattern")


def explicit_causal_mask(hidden_states: torch.Tensor, past_key_values, layer_index: int) -> torch.Tensor:
    """The bool mask [1, 1, queries, keys] that SDPA's implicit causal mode applies (True = may attend)."""
    past = past_key_values.get_seq_length(layer_index) if past_key_values is not None else 0
    queries = hidden_states.shape[-2]
    keys = torch.arange(past + queries, device=hidden_states.device)
    rows = torch.arange(queries, device=hidden_states.device)[:, None] + past
    return (keys[None, :] <= rows)[None, None]


def _input_hook(point: HookPoint, fn: HookFn):
    def hook(module, args, kwargs):
        positional = bool(args) and point.key not in kwargs
        value = args[0] if positional else kwargs.get(point.key)
        if point.key == "attention_mask":
            # one mask object is shared by every layer: hand out a copy
            value = explicit_causal_mask(kwargs["hidden_states"], kwargs.get("past_key_values"),
                                         getattr(module, "layer_idx", 0)) if value is None else value.clone()
        replacement = fn(value, point.name)
        if replacement is None:
            return None
        if positional:
            return (replacement, *args[1:]), kwargs
        return args, {**kwargs, point.key: replacement}
    return hook


def _output_hook(point: HookPoint, fn: HookFn):
    def hook(module, args, output):
        value = output[0] if isinstance(output, tuple) else output
        replacement = fn(value, point.name)
        if replacement is None:
            return None
        return (replacement, *output[1:]) if isinstance(output, tuple) else replacement
    return hook


@contextlib.contextmanager
def hooked(loaded, hooks: Iterable[tuple[str, HookFn]]):
    """While active, every `(name, fn)` hook acts on the model's forwards in this context (also inside
    `generate`, where the LM runs once over the prompt and then once per new token)."""
    hooks = list(hooks)
    points = [hook_point(loaded, name) for name, _ in hooks]
    for point in points:
        if point.kind == "pattern":
            raise UserInputError(f"{point.name} is read-only: block attention by editing "
                                 f"{point.name.replace('hook_pattern', 'hook_mask')} instead")
    with contextlib.ExitStack() as stack:
        # Each is put in front of the module's own hooks (transformers records hidden states, e.g. LLaVA's
        # vision features, with forward hooks); in reverse, so that they still run in the order given.
        for point, (_, fn) in reversed(list(zip(points, hooks))):
            if point.kind == "input":
                stack.enter_context(scoped_hook(point.module, _input_hook(point, fn), pre=True, prepend=True))
            else:
                stack.enter_context(scoped_hook(point.module, _output_hook(point, fn), prepend=True))
        yield


def model_inputs(loaded, trace_or_inputs) -> dict:
    """A Trace becomes one teacher-forced forward over its prompt and answer; a dict is used as given."""
    if isinstance(trace_or_inputs, Trace):
        return replay_inputs(trace_or_inputs, loaded.device)
    return {name: value.to(loaded.device) if isinstance(value, torch.Tensor) else value
            for name, value in dict(trace_or_inputs).items()}


@torch.no_grad()
def run_with_hooks(loaded, trace_or_inputs, hooks: Iterable[tuple[str, HookFn]]):
    """One forward (no KV cache) with the hooks active; returns the model's output."""
    with hooked(loaded, hooks):
        return loaded.model(**model_inputs(loaded, trace_or_inputs), use_cache=False)


@torch.no_grad()
def run_with_cache(loaded, trace_or_inputs, names: Iterable[str] | Callable[[str], bool] | None = None,
                   hooks: Iterable[tuple[str, HookFn]] = ()):
    """One forward; returns (output, {name: value}) for the named points. `names`: a list, a predicate on
    names, or None for every point but the attention patterns (those switch the attention to explicit
    probabilities). `hooks` act first, so the cache sees their edits."""
    if names is None:
        names = [n for n in hook_point_names(loaded) if not n.endswith("hook_pattern")]
    elif callable(names):
        names = [n for n in hook_point_names(loaded) if names(n)]
    names = list(dict.fromkeys(names))
    points = [hook_point(loaded, name) for name in names]
    cache: dict[str, torch.Tensor] = {}

    def keep(value, name):
        cache[name] = value.detach()

    patterns = [point for point in points if point.kind == "pattern"]
    with hooked(loaded, list(hooks) + [(p.name, keep) for p in points if p.kind != "pattern"]), \
            AttentionGraph([p.module for p in patterns]) as graph:
        output = loaded.model(**model_inputs(loaded, trace_or_inputs), use_cache=False)
    for slot, point in enumerate(patterns):
        calls = [weights.detach() for weights in graph.weights[slot]]
        cache[point.name] = calls[0] if len(calls) == 1 else calls  # Qwen2-VL's tower: one call per image
    return output, {name: cache[name] for name in names if name in cache}
