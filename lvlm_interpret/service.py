"""The service: the only owner of loaded models and of cached traces and explanations.

The CLI, the Python API and the web app all go through it. A request's inputs (image, prompt, options) are
kept in one cache bounded in bytes, its Trace and maps in another; a request whose Trace was evicted is
regenerated transparently (generation is deterministic for fixed options), one whose inputs were evicted is
forgotten ("unknown or expired request").
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from .analysis.ablation import ablate, example_mean_embedding
from .analysis.knockout import WINDOWS, knockout
from .analysis.logit_lens import LogitLens, logit_lens
from .analysis.token_sets import select_tokens
from .capture import GenerationOptions, generate_with_capture, scoped_hook
from .errors import ServiceBusyError, UnknownRequestError, UserInputError
from .export import export_files
from .methods import METHODS, Explanation, get_method
from .methods.attention import attention_overview, reverse_attention
from .methods.base import check_method_options
from .methods.visual_relevance import visually_relevant_tokens
from .models.loading import CONFIGS_DIR, DEFAULT_MODEL, LoadedModel, load_model
from .trace import Trace
from .trust import token_trust


HOSTED_CONFIG = CONFIGS_DIR / "hosted.json"


def hosted_limits() -> dict:
    """The hosted mode's limits (configs/hosted.json): models, max_new_tokens, max_upload_mb, max_image_pixels,
    image_memory_mb, rate_limit_per_minute, concurrency, queue, timeout_s, cache_mb."""
    return json.loads(HOSTED_CONFIG.read_text())


@dataclass(frozen=True)
class Request:
    model: str
    images: tuple[Image.Image, ...]
    prompt: str
    options: GenerationOptions
    answer_ids: tuple[int, ...] = ()  # what the first generation answered: a regenerated trace must match it


class ByteBoundedCache:
    """Least-recently-used mapping whose values' sizes add up to at most `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key, value, size: int) -> None:
        with self._lock:
            self._entries[key] = value
            self._sizes[key] = size
            self._entries.move_to_end(key)
            while sum(self._sizes.values()) > self.max_bytes and len(self._entries) > 1:
                oldest, _ = self._entries.popitem(last=False)
                del self._sizes[oldest]

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())


class _OverTime(Exception):
    """Raised inside a model forward once a request's time limit has passed (caught by the service)."""


def request_nbytes(request: Request) -> int:
    return sum(image.width * image.height * len(image.getbands()) for image in request.images) + 1024


class ExplainService:

    def __init__(self, default_model: str = DEFAULT_MODEL, cache_bytes: int = 1 << 30,
                 allowed_models: list[str] | None = None, max_new_tokens: int | None = None,
                 timeout_s: float | None = None, requests_bytes: int = 256 << 20, **load_options):
        """`allowed_models` / `max_new_tokens` / `timeout_s` (per computation): the hosted mode's limits (None: no
        limit). Requests' inputs are kept, least recently used first out, within `requests_bytes`."""
        self.default_model = default_model
        self.allowed_models = allowed_models
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.load_options = load_options
        self._models: dict[str, LoadedModel] = {}
        self._model_lock = threading.Lock()
        self._requests = ByteBoundedCache(requests_bytes)
        self._cache = ByteBoundedCache(cache_bytes)

    def memory(self) -> dict[str, int]:
        """Bytes held for requests: cached traces and maps, and the requests' inputs, with their bounds."""
        return {"cache_bytes": self._cache.nbytes, "cache_limit": self._cache.max_bytes,
                "requests_bytes": self._requests.nbytes, "requests_limit": self._requests.max_bytes}

    def model(self, name: str | None = None) -> LoadedModel:
        name = name or self.default_model
        with self._model_lock:
            if name not in self._models:
                self._models[name] = load_model(name, **self.load_options)
            return self._models[name]

    def generate(self, images: list[Image.Image], prompt: str, model: str | None = None,
                 options: GenerationOptions | None = None) -> tuple[str, Trace]:
        """Run a new request; returns its id (for later `explain` calls) and its Trace."""
        options = replace(options) if options else GenerationOptions()
        options.validate()
        model = model or self.default_model
        if self.allowed_models is not None and model not in self.allowed_models:
            raise UserInputError(f"model {model!r} is not offered here; choose one of {', '.join(self.allowed_models)}")
        if self.max_new_tokens is not None and options.max_new_tokens > self.max_new_tokens:
            raise UserInputError(f"answers are limited to {self.max_new_tokens} new tokens here")
        request = Request(model, tuple(images), prompt, options)
        trace = self._run(request)
        request = replace(request, answer_ids=tuple(trace.answer_ids))
        request_id = uuid.uuid4().hex
        self._requests.put(request_id, request, request_nbytes(request))
        self._cache.put(("trace", request_id), trace, trace.nbytes)
        return request_id, trace

    def trace(self, request_id: str) -> Trace:
        cached = self._cache.get(("trace", request_id))
        if cached is not None:
            return cached
        request = self.request(request_id)
        trace = self._run(request)
        if tuple(trace.answer_ids) != request.answer_ids:
            raise UnknownRequestError("this answer could not be reproduced to explain it (the model now answers "
                                      "differently): generate the answer again")
        self._cache.put(("trace", request_id), trace, trace.nbytes)
        return trace

    def request(self, request_id: str) -> Request:
        request = self._requests.get(request_id)
        if request is None:
            raise UnknownRequestError("unknown or expired request: generate an answer first")
        return request

    def explain(self, request_id: str, method: str, token_index: int, **options) -> Explanation:
        """The method's explanation of one answer token, computed on first use and cached."""
        explainer = get_method(method)
        explainer.check_options(options)
        key = ("explanation", request_id, method, token_index, json.dumps(options, sort_keys=True, default=str))
        return self._computed(key, request_id, lambda loaded, trace: explainer.explain(
            trace, token_index, model=loaded, **options), lambda result, trace: sum(m.nbytes for m in result.maps))

    def attention_overview(self, request_id: str, token_index: int) -> dict[str, np.ndarray]:
        """Layer x head attention mass of the token on image tokens, prompt text and earlier answer tokens."""
        return attention_overview(self.trace(request_id), token_index)

    def reverse_attention(self, request_id: str, cells: list[tuple[int, int]], layers="all", heads="all",
                          aggregation="mean") -> np.ndarray:
        """For chosen cells of the first image's grid, the attention every answer token pays them."""
        return reverse_attention(self.trace(request_id), cells, 0, layers, heads, aggregation)

    def export(self, request_id: str, token_index: int, kind: str, folder, options: dict | None = None) -> list:
        """Write an export ("png", "request" or "report") of the request into `folder`, with the methods'
        `options` ({method: {name: value}}); returns the paths."""
        return export_files(self, request_id, token_index, kind, folder, options)

    def trust(self, request_id: str, token_index: int, options: dict | None = None) -> dict:
        """Which map to believe for the token (lvlm_interpret.trust): every method's maps with the methods'
        `options` ({method: {name: value}}), their deletion / insertion AUCs and agreement, the image share of
        relevancy, a verdict; cached."""
        options = check_method_options(options or {})
        trace = self.trace(request_id)
        trace.check_token_index(token_index)
        explanations = {method: self.explain(request_id, method, token_index, **options.get(method, {}))
                        for method in sorted(METHODS)}
        maps = {name: grids[0] for explanation in explanations.values()
                for name, grids in explanation.all_maps().items()}
        key = ("trust", request_id, token_index, json.dumps(options, sort_keys=True, default=str))
        return self._computed(key, request_id, lambda loaded, trace: token_trust(
            loaded, trace, token_index, maps, explanations["relevancy"]), lambda result, trace: 4096)

    def visual_relevance(self, request_id: str, threshold: float = 1.0):
        """Which answer tokens depend on seeing the image (LLR, image vs blurred), cached per request."""
        return self._computed(("visual_relevance", request_id, threshold), request_id,
                              lambda loaded, trace: visually_relevant_tokens(loaded, trace, threshold),
                              lambda result, trace: 64 * trace.n_answer)

    # --- analyses (Neo et al.): lvlm_interpret.analysis on the request's trace and model ---------------------
    def logit_lens(self, request_id: str, k: int = 5) -> LogitLens:
        """Top-k vocabulary tokens of every image patch at every layer, cached per request."""
        return self._computed(("logit_lens", request_id, k), request_id,
                              lambda loaded, trace: logit_lens(loaded, trace, k),
                              lambda result, trace: 2 * result.probs.nbytes + 32 * result.probs.size)

    def analysis_tokens(self, request_id: str, kind: str, token_index: int = 0, **selection) -> list[int]:
        """Positions of a token set (object box, register, random, top-k of a method) of the first image."""
        trace = self.trace(request_id)
        loaded = self.model(trace.model_name)
        with self._limits(loaded):
            return select_tokens(loaded, trace, kind, token_index=token_index, **selection)

    def ablate(self, request_id: str, positions: list[int], token_index: int = 0, replacement: str = "mean"):
        """Mean (over the example scenes) or zero ablation of image tokens; the answer is regenerated."""
        trace = self.trace(request_id)
        loaded = self.model(trace.model_name)
        with self._limits(loaded):
            mean = example_mean_embedding(loaded) if replacement == "mean" else None
            return ablate(loaded, trace, positions, replacement, mean, token_index)

    def knockout(self, request_id: str, positions: list[int], token_index: int = 0, windows=tuple(WINDOWS)):
        """Attention from the token's predicting position to `positions` blocked per layer window."""
        trace = self.trace(request_id)
        loaded = self.model(trace.model_name)
        with self._limits(loaded):
            return knockout(loaded, trace, positions, token_index, windows=windows)

    def _computed(self, key, request_id: str, compute, nbytes):
        """`compute(loaded, trace)` for the request, under the limits, cached under `key` with its size
        `nbytes(result, trace)` (plus a little for the object)."""
        cached = self._cache.get(key)
        if cached is None:
            trace = self.trace(request_id)
            loaded = self.model(trace.model_name)
            with self._limits(loaded):
                cached = compute(loaded, trace)
            self._cache.put(key, cached, nbytes(cached, trace) + 1024)
        return cached

    def _run(self, request: Request) -> Trace:
        loaded = self.model(request.model)
        with self._limits(loaded):
            return generate_with_capture(loaded, list(request.images), request.prompt, request.options)

    @contextlib.contextmanager
    def _limits(self, loaded: LoadedModel):
        """Run model work under the time limit, and turn running out of memory or time into one message; the
        model stays usable for the next request."""
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s

        def check_deadline(module, args, kwargs):
            if deadline is not None and time.monotonic() > deadline:
                raise _OverTime

        try:
            # every forward of the language model passes its first attention layer
            with scoped_hook(loaded.family.language_attentions(loaded.model)[0], check_deadline, pre=True):
                yield
        except _OverTime:
            raise ServiceBusyError(f"the request took longer than {self.timeout_s:g} s and was stopped: ask for "
                                   "fewer new tokens or a cheaper method") from None
        except (torch.OutOfMemoryError, MemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise ServiceBusyError("out of memory: try a smaller image or fewer new tokens, or retry when the "
                                   "server is less busy") from None


def hosted_service(model: str, limits: dict, **load_options) -> ExplainService:
    """A service under the hosted `limits`: `model` if it is allowed, else the first allowed model."""
    allowed = limits["models"]
    return ExplainService(default_model=model if model in allowed else allowed[0],
                          cache_bytes=limits["cache_mb"] * 2 ** 20, allowed_models=allowed,
                          max_new_tokens=limits["max_new_tokens"], timeout_s=limits["timeout_s"], **load_options)
