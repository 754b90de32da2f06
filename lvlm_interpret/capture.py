"""Generation with capture: one `generate` call that also records what the explanation methods need.

Capture rides on a registered attention implementation (`lvlm_capture`): every attention call runs the fast
SDPA kernel, and for the language-model layers the softmax row of the *last* query is recomputed on the side.
With a KV cache that last query is exactly the position that predicts the next token, so one generation
yields every answer token's attention row in every layer and head, without eager attention and without
keeping the layers x heads x P x P prompt attention.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import (
    AttentionInterface, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .errors import UserInputError
from .trace import Trace

CAPTURE_ATTENTION = "lvlm_capture"
_ACTIVE_RECORDER: contextvars.ContextVar["_Recorder | None"] = contextvars.ContextVar("lvlm_recorder", default=None)
_HOOK_SCOPE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("lvlm_hook_scope", default=frozenset())


@contextlib.contextmanager
def scoped_hook(module, hook, pre: bool = False, prepend: bool = False):
    """Register a forward hook (or pre-hook with kwargs) that acts only for forwards run in this context (thread
    or task): a model is shared by concurrent requests, and another request's forward must not be touched.
    `prepend` runs it before the module's other hooks (e.g. transformers' hidden-state recorders, which must
    see an edited output)."""
    marker = object()
    token = _HOOK_SCOPE.set(_HOOK_SCOPE.get() | {marker})

    def scoped(*args):
        return hook(*args) if marker in _HOOK_SCOPE.get() else None

    handle = module.register_forward_pre_hook(scoped, with_kwargs=True, prepend=prepend) if pre else \
        module.register_forward_hook(scoped, prepend=prepend)
    try:
        yield
    finally:
        handle.remove()
        _HOOK_SCOPE.reset(token)


def last_query_attention(query, key, attention_mask, scaling) -> torch.Tensor:
    """Softmax attention weights [heads, keys] of the last query position (batch element 0)."""
    q = query[0:1, :, -1:, :].float()
    k = repeat_kv(key[0:1], q.shape[1] // key.shape[1]).float()
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    if attention_mask is not None:
        row = attention_mask[0:1, :, -1:, : k.shape[-2]]
        scores = scores.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else scores + row.float()
    return torch.softmax(scores, dim=-1)[0, :, 0, :]


_ACTIVE_GRAPH: contextvars.ContextVar["AttentionGraph | None"] = contextvars.ContextVar("lvlm_graph", default=None)


def eager_attention(module, query, key, value, attention_mask, scaling, is_causal, softcap=None):
    """Attention with explicit probabilities (kept in the autograd graph); output laid out as SDPA's.
    `softcap` caps the logits as softcap * tanh(logits / softcap) (Gemma 2)."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query @ key.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    elif is_causal and query.shape[2] > 1:
        offset = key.shape[-2] - query.shape[2]
        blocked = torch.ones(query.shape[2], key.shape[-2], dtype=torch.bool, device=scores.device).triu(offset + 1)
        scores = scores.masked_fill(blocked, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    output = (weights.to(value.dtype) @ value).transpose(1, 2).contiguous()
    return output, weights


class AttentionGraph:
    """While active, the given attention modules run eager attention and keep their probabilities, with their
    autograd graph, in `weights[module_index]` (one entry per call), so gradients w.r.t. them can be taken."""

    def __init__(self, modules):
        self.slot = {id(module): index for index, module in enumerate(modules)}
        self.weights: list[list[torch.Tensor]] = [[] for _ in modules]

    def __enter__(self):
        self._token = _ACTIVE_GRAPH.set(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE_GRAPH.reset(self._token)


def capture_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    graph = _ACTIVE_GRAPH.get()
    softcap = kwargs.get("softcap")
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if graph is not None and id(module) in graph.slot:
        output, weights = eager_attention(module, query, key, value, attention_mask, scaling, is_causal, softcap)
        graph.weights[graph.slot[id(module)]].append(weights)
        return output, weights
    if softcap is None:
        output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    else:  # SDPA cannot soft-cap logits (Gemma 2): explicit attention, whose last row is the one to record
        output, weights = eager_attention(module, query, key, value, attention_mask, scaling, is_causal, softcap)
    recorder = _ACTIVE_RECORDER.get()
    if recorder is not None:
        layer = recorder.layer_of.get(id(module))
        if layer is not None:
            row = last_query_attention(query, key, attention_mask, scaling) if softcap is None else weights[0, :, -1]
            recorder.rows[layer].append(row.half().cpu())
    return output, None


AttentionInterface.register(CAPTURE_ATTENTION, capture_attention)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


class _Recorder:
    """What one generation records: per LM layer, the last query's attention row of every forward; the final
    norm's outputs."""

    def __init__(self, attention_modules):
        self.layer_of = {id(module): index for index, module in enumerate(attention_modules)}
        self.rows: list[list[torch.Tensor]] = [[] for _ in attention_modules]
        self.hidden: list[torch.Tensor] = []


@contextlib.contextmanager
def _recording(attention_modules, final_norm):
    recorder = _Recorder(attention_modules)
    token = _ACTIVE_RECORDER.set(recorder)
    try:
        with scoped_hook(final_norm, lambda module, args, output: recorder.hidden.append(
                output[0].detach().half().cpu())):
            yield recorder
    finally:
        _ACTIVE_RECORDER.reset(token)


MAX_SEED = 2 ** 64 - 1  # torch seeds its generators with an unsigned 64-bit integer


@dataclass
class GenerationOptions:
    max_new_tokens: int = 32
    min_new_tokens: int = 0  # > 0 suppresses the end token until then (benchmarks use a fixed answer length)
    do_sample: bool = False  # greedy unless asked
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    @classmethod
    def from_temperature(cls, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                         seed: int = 0) -> "GenerationOptions":
        """The options a user asks for: greedy at temperature 0, else sampled with `top_p` and `seed`."""
        return cls(max_new_tokens, do_sample=temperature != 0, temperature=temperature, top_p=top_p, seed=seed)

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= 1024:
            raise UserInputError(f"max new tokens must be between 1 and 1024, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UserInputError(f"min new tokens must be between 0 and max new tokens, got {self.min_new_tokens}")
        if self.do_sample and self.temperature == 0:
            raise UserInputError("sampling needs a temperature between 0.01 and 10 (temperature 0 means greedy)")
        # below 0.01, logits / temperature overflow to inf and sampling fails; NaN and infinities fail both tests
        if not (self.temperature == 0 or 0.01 <= self.temperature <= 10):
            raise UserInputError(f"temperature must be 0 (greedy) or between 0.01 and 10 (sampling), "
                                 f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserInputError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserInputError(f"seed must be an integer between 0 and {MAX_SEED} (64 bits), got {self.seed}")


# processor, tokenizer and config attributes naming the tokens that stand for an image or a video in the text
# (image_token, boi_token, global_image_tag, vision_start_token_id, video_token_index, ...)
_PLACEHOLDER_NAME = re.compile(r"(image|video|vision|boi|eoi)\w*_(token|tag|token_id|token_index)$")


def image_placeholders(loaded) -> set[str]:
    """The special tokens (text) by which the model's processor places images and videos, found through the
    processor's, the tokenizer's and the config's own names for them."""
    tokenizer = loaded.processor.tokenizer
    found = set()
    for named in (vars(loaded.model.config), vars(loaded.processor), tokenizer.special_tokens_map):
        for name, value in named.items():
            if not _PLACEHOLDER_NAME.search(name):
                continue
            if type(value) is int and 0 <= value < len(tokenizer):
                found.add(tokenizer.convert_ids_to_tokens(value))
            elif isinstance(value, str):
                found.add(value)
    unknown = (None, tokenizer.unk_token_id)
    return {text for text in found if text and tokenizer.convert_tokens_to_ids(text) not in unknown}


def build_inputs(loaded, images, prompt: str):
    """The processor's model inputs for a single-turn chat: the images first, then the prompt."""
    if not prompt or not prompt.strip():
        raise UserInputError("the prompt is empty: type a question about the image")
    placeholders = sorted(text for text in image_placeholders(loaded) if text in prompt)
    if placeholders:
        raise UserInputError(f"the prompt holds {', '.join(placeholders)}, which {loaded.name} reads as the place of "
                             "an image or video: remove it from the prompt (the image is placed for you)")
    if not images:
        raise UserInputError("no image given: provide at least one image")
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt.strip()}]
    text = loaded.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                tokenize=False)
    inputs = loaded.processor(images=list(images), text=text, return_tensors="pt")
    limit = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and inputs["input_ids"].shape[1] >= limit:
        raise UserInputError(
            f"the prompt and image take {inputs['input_ids'].shape[1]} tokens, more than the model's context of "
            f"{limit}: shorten the prompt or use fewer images"
        )
    return inputs


def replay_inputs(trace: Trace, device=None, model_inputs: dict | None = None) -> dict:
    """Model inputs for one teacher-forced forward over the trace's final sequence (prompt + answer);
    `model_inputs` replaces the trace's own (e.g. the pixels of an altered image)."""
    inputs = {"input_ids": trace.input_ids[None], "attention_mask": torch.ones_like(trace.input_ids)[None]}
    for name, value in (trace.model_inputs if model_inputs is None else model_inputs).items():
        # per-position inputs of the prompt (e.g. Qwen's mm_token_type_ids) extend over the answer as the trace
        # recorded them (PaliGemma's causal suffix), else as text (0)
        if value.dim() == 2 and value.shape == (1, trace.prompt_length):
            recorded = trace.model_inputs.get(name)
            answer = recorded[:, trace.prompt_length:] if recorded is not None and \
                recorded.shape == (1, trace.input_ids.shape[0]) else torch.zeros(1, trace.n_answer, dtype=value.dtype)
            value = torch.cat([value, answer.to(value.dtype)], dim=1)
        inputs[name] = value
    return {name: value.to(device) if device is not None else value for name, value in inputs.items()}


def image_inputs(inputs) -> dict[str, torch.Tensor]:
    """The processor's inputs besides the token ids and mask (pixels, grids, token types), without training
    labels (PaliGemma's processor adds them), which would make the model compute a loss."""
    return {name: value for name, value in inputs.items()
            if name not in ("input_ids", "attention_mask", "labels") and isinstance(value, torch.Tensor)}


def _recorded_inputs(inputs, answer_values: dict[str, int], n_answer: int) -> dict[str, torch.Tensor]:
    """The processor's inputs that re-running the model needs; the per-position ones a family gives answer tokens a
    value for (`answer_input_values`, e.g. PaliGemma's token_type_ids 1 = causal suffix) cover the answer too."""
    recorded = {}
    for name, value in image_inputs(inputs).items():
        value = value.detach().cpu()
        if name in answer_values:
            value = torch.cat([value, torch.full((1, n_answer), answer_values[name], dtype=value.dtype)], dim=1)
        recorded[name] = value
    return recorded


class SeededSampler(LogitsProcessor):
    """Draws the next token by temperature, top-k and nucleus (top-p) sampling from the request's own generator,
    and leaves only that token possible; `generate` then picks it greedily."""

    def __init__(self, options: GenerationOptions, top_k: int | None = None):
        self.warpers = [TemperatureLogitsWarper(options.temperature), TopPLogitsWarper(options.top_p)]
        if top_k:
            self.warpers.insert(1, TopKLogitsWarper(top_k))
        self.seed = options.seed
        self.generator = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generator is None:
            self.generator = torch.Generator(scores.device).manual_seed(self.seed)
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        drawn = torch.multinomial(torch.softmax(scores.float(), dim=-1), 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)


@torch.no_grad()
def generate_with_capture(loaded, images, prompt: str, options: GenerationOptions | None = None) -> Trace:
    """Generate an answer to `prompt` about `images` and return the Trace of that generation."""
    options = options or GenerationOptions()
    options.validate()
    model, family, tokenizer = loaded.model, loaded.family, loaded.processor.tokenizer
    inputs = build_inputs(loaded, images, prompt)
    layouts = family.image_layouts(model, loaded.processor, inputs, list(images))
    prompt_length = int(inputs["input_ids"].shape[1])

    # greedy decoding over logits that a seeded sampler has reduced to its draw: the request owns its generator,
    # so concurrent requests with the same seed give the same answer
    sampler = [SeededSampler(options, model.generation_config.top_k)] if options.do_sample else []
    with _recording(family.language_attentions(model), family.final_norm(model)) as recorder:
        output = model.generate(
            **inputs.to(loaded.device),
            max_new_tokens=options.max_new_tokens,
            min_new_tokens=options.min_new_tokens,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False, temperature=None, top_p=None, top_k=None,
            logits_processor=LogitsProcessorList(sampler),
        )

    sequence = output.sequences[0].cpu()
    configured_eos = model.generation_config.eos_token_id
    stop_ids = {tokenizer.eos_token_id, *(configured_eos if isinstance(configured_eos, list) else [configured_eos])}
    n_answer = int(sequence.shape[0]) - prompt_length
    # A final end-of-sequence token ends the answer; it is not part of it.
    if n_answer > 1 and int(sequence[-1]) in stop_ids:
        n_answer -= 1
    sequence = sequence[: prompt_length + n_answer]
    n_keys = prompt_length + n_answer - 1

    attention = torch.zeros(n_answer, len(recorder.rows), recorder.rows[0][0].shape[0], n_keys, dtype=torch.float16)
    for layer, rows in enumerate(recorder.rows):
        for t in range(n_answer):
            # a sliding-window layer's cache keeps only the last keys: its row ends at the predicting position
            end = prompt_length + t
            attention[t, layer, :, end - rows[t].shape[-1]: end] = rows[t]
    hidden = torch.cat(recorder.hidden, dim=0)[:n_keys]
    logprobs = torch.stack([
        torch.log_softmax(output.logits[t][0].float(), dim=-1)[sequence[prompt_length + t]].cpu()
        for t in range(n_answer)
    ])
    return Trace(
        model_name=loaded.name,
        prompt=prompt.strip(),
        answer=tokenizer.decode(sequence[prompt_length:], skip_special_tokens=True).strip(),
        input_ids=sequence.long(),
        prompt_length=prompt_length,
        token_texts=[tokenizer.decode([token]) for token in sequence.tolist()],
        images=layouts,
        attention=attention,
        hidden=hidden,
        answer_logprobs=logprobs.float(),
        model_inputs=_recorded_inputs(inputs, family.answer_input_values, n_answer),
        pixels=[torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()) for image in images],
        generation=asdict(options),
        special_token_ids=sorted(set(tokenizer.all_special_ids)),
    )
