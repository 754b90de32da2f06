"""The service: the only owner of loaded models and of cached traces and explanations.

The CLI, the Python API and the web app all go through it. A request's inputs (image, prompt, options) are
kept in one cache bounded in bytes, its Trace and maps in another; a request whose Trace was evicted is
regenerated transparently (generation is deterministic for fixed options), one whose inputs were evicted is
forgotten ("unknown or expired request"). A share link's id keeps a request's inputs and answer ids in a third
store, bounded in bytes too, so the request comes back identical from any session until the link expires.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import numpy as np
import torch
from PIL import Image

from .analysis.ablation import ablate, example_mean_embedding
from .analysis.knockout import WINDOWS, knockout
from .analysis.logit_lens import LogitLens, logit_lens
from .analysis.token_sets import select_tokens
from .backend import ShareLink, SharedRequest
from .capture import GenerationOptions, generate_with_capture, scoped_hook
from .errors import ServiceBusyError, UnknownRequestError, UserInputError
from .export import export_files
from .methods import Explanation, get_method
from .methods.attention import attention_overview, reverse_attention
from .methods.base import check_method_options, quick_methods
from .methods.visual_relevance import visually_relevant_tokens
from .models.loading import CONFIGS_DIR, DEFAULT_MODEL, LoadedModel, load_model
from .sae import views as sae_views
from .sae.features import FeatureEdit, editing, generate_edited, load_sae_for
from .sae.format import SAE_NAMES
from .trace import Trace
from .trust import token_trust


HOSTED_CONFIG = CONFIGS_DIR / "hosted.json"


def hosted_limits() -> dict:
    """The hosted mode's limits (configs/hosted.json): models, max_new_tokens, max_upload_mb, max_image_pixels,
    image_memory_mb, rate_limit_per_minute, concurrency, queue, timeout_s, cache_mb, share_link_hours."""
    return json.loads(HOSTED_CONFIG.read_text())


@dataclass(frozen=True)
class Request:
    model: str
    images: tuple[Image.Image, ...]
    prompt: str
    options: GenerationOptions
    answer_ids: tuple[int, ...] = ()  # what the first generation answered: a regenerated trace must match it
    feature_edit: FeatureEdit | None = None  # SAE features edited while answering (and while explaining again)


@dataclass(frozen=True)
class _Share:
    request_id: str
    request: Request | None  # None once found expired: the inputs are dropped, the id still says it expired
    expires_at: float | None


SHARE_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")  # what secrets.token_urlsafe gives
UNKNOWN_SHARE = ("unknown shared link: it was not made here, or was forgotten (a bounded number of links is kept, "
                 "and none across a restart of the server); ask whoever sent it for a new link")


def check_share_id(share_id: str) -> None:
    if not SHARE_ID.fullmatch(share_id or ""):
        raise UnknownRequestError(UNKNOWN_SHARE)


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
                 timeout_s: float | None = None, requests_bytes: int = 256 << 20, shares_bytes: int = 128 << 20,
                 share_lifetime_s: float | None = None, **load_options):
        """`allowed_models` / `max_new_tokens` / `timeout_s` (per computation): the hosted mode's limits (None: no
        limit). Requests' inputs are kept, least recently used first out, within `requests_bytes`; shared requests'
        within `shares_bytes`, each link for `share_lifetime_s` (None: until the store forgets it)."""
        self.default_model = default_model
        self.allowed_models = allowed_models
        self.max_new_tokens = max_new_tokens
        self.timeout_s = timeout_s
        self.load_options = load_options
        self._models: dict[str, LoadedModel] = {}
        self._model_lock = threading.Lock()
        self._requests = ByteBoundedCache(requests_bytes)
        self._cache = ByteBoundedCache(cache_bytes)
        self._shares = ByteBoundedCache(shares_bytes)
        self.saes = dict(SAE_NAMES)  # name -> SAE folder the sae_* calls may use
        self._saes: dict = {}
        self.share_lifetime_s = share_lifetime_s
        self.clock = time.time  # wall-clock seconds: an expiry is shown to users as a date

    def memory(self) -> dict[str, int]:
        """Bytes held for requests: cached traces and maps, and the requests' inputs, with their bounds."""
        return {"cache_bytes": self._cache.nbytes, "cache_limit": self._cache.max_bytes,
                "requests_bytes": self._requests.nbytes, "requests_limit": self._requests.max_bytes,
                "shares_bytes": self._shares.nbytes, "shares_limit": self._shares.max_bytes}

    def model(self, name: str | None = None) -> LoadedModel:
        name = name or self.default_model
        with self._model_lock:
            if name not in self._models:
                self._models[name] = load_model(name, **self.load_options)
            return self._models[name]

    def generate(self, images: list[Image.Image], prompt: str, model: str | None = None,
                 options: GenerationOptions | None = None,
                 feature_edit: FeatureEdit | None = None) -> tuple[str, Trace]:
        """Run a new request; returns its id (for later `explain` calls) and its Trace. `feature_edit` (its `sae`
        one of self.saes) edits SAE features while answering and whenever a method runs the model again."""
        options = replace(options) if options else GenerationOptions()
        options.validate()
        model = model or self.default_model
        if self.allowed_models is not None and model not in self.allowed_models:
            raise UserInputError(f"model {model!r} is not offered here; choose one of {', '.join(self.allowed_models)}")
        if self.max_new_tokens is not None and options.max_new_tokens > self.max_new_tokens:
            raise UserInputError(f"answers are limited to {self.max_new_tokens} new tokens here")
        request = Request(model, tuple(images), prompt, options, feature_edit=feature_edit)
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

    def share(self, request_id: str) -> ShareLink:
        """A link id that reopens the request from any session: the request's inputs and answer ids are kept with
        it (least recently opened first out of `shares_bytes`) until it expires."""
        request = self.request(request_id)
        expires_at = None if self.share_lifetime_s is None else self.clock() + self.share_lifetime_s
        share_id = secrets.token_urlsafe(24)
        self._shares.put(share_id, _Share(request_id, request, expires_at), request_nbytes(request))
        return ShareLink(share_id, expires_at)

    def shared_request(self, share_id: str) -> tuple[str, Request]:
        """The id and inputs of the request a link names; UnknownRequestError (one line) if the link is unknown
        or expired."""
        check_share_id(share_id)
        share = self._shares.get(share_id)
        if share is None:
            raise UnknownRequestError(UNKNOWN_SHARE)
        if share.request is not None and share.expires_at is not None and self.clock() > share.expires_at:
            share = replace(share, request=None)
            self._shares.put(share_id, share, 256)
        if share.request is None:
            hours = f" (links here last {self.share_lifetime_s / 3600:g} h)" if self.share_lifetime_s else ""
            when = datetime.fromtimestamp(share.expires_at, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            raise UnknownRequestError(f"this shared link expired on {when}{hours}: ask whoever sent it for a new link")
        return share.request_id, share.request

    def open_shared(self, share_id: str) -> SharedRequest:
        """The request a link names, under its id here: served from the cache, or its inputs restored and its
        answer regenerated (and checked against the answer shared) if they were evicted."""
        request_id, request = self.shared_request(share_id)
        if self._requests.get(request_id) is None:
            self._requests.put(request_id, request, request_nbytes(request))
        return SharedRequest(request_id, self.trace(request_id), list(request.images), request.options)

    def explain(self, request_id: str, method: str, token_index: int, **options) -> Explanation:
        """The method's explanation of one answer token, computed on first use and cached."""
        explainer = get_method(method)
        explainer.check_options(options)
        key = ("explanation", request_id, method, token_index, json.dumps(options, sort_keys=True, default=str))
        return self._computed(key, request_id, lambda loaded, trace: explainer.explain(
            trace, token_index, model=loaded, **options), lambda result, trace: sum(m.nbytes for m in result.maps))

    def explain_answer(self, request_id: str, method: str = "igos", **options) -> Explanation:
        """The method's one map for the whole answer (igos: the visually relevant tokens together), computed on
        first use and cached."""
        explainer = get_method(method)
        if not hasattr(explainer, "explain_answer"):
            raise UserInputError(f"{method} has no answer-level map: igos has one")
        explainer.check_options(options)
        key = ("answer", request_id, method, json.dumps(options, sort_keys=True, default=str))
        return self._computed(key, request_id, lambda loaded, trace: explainer.explain_answer(
            trace, model=loaded, **options), lambda result, trace: sum(m.nbytes for m in result.maps))

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
                        for method in quick_methods()}
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
        with self._limits(loaded), self._edited(loaded, trace):
            return select_tokens(loaded, trace, kind, token_index=token_index, **selection)

    def ablate(self, request_id: str, positions: list[int], token_index: int = 0, replacement: str = "mean"):
        """Mean (over the example scenes) or zero ablation of image tokens; the answer is regenerated."""
        trace = self.trace(request_id)
        loaded = self.model(trace.model_name)
        with self._limits(loaded), self._edited(loaded, trace):
            mean = example_mean_embedding(loaded) if replacement == "mean" else None
            return ablate(loaded, trace, positions, replacement, mean, token_index)

    def knockout(self, request_id: str, positions: list[int], token_index: int = 0, windows=tuple(WINDOWS)):
        """Attention from the token's predicting position to `positions` blocked per layer window."""
        trace = self.trace(request_id)
        loaded = self.model(trace.model_name)
        with self._limits(loaded), self._edited(loaded, trace):
            return knockout(loaded, trace, positions, token_index, windows=windows)

    # --- sparse autoencoders (lvlm_interpret.sae) on the request's first image: `sae` names one of self.saes ----
    def sae_features(self, request_id: str, sae: str = "demo", k: int = 10) -> dict:
        """Each cell's top-k SAE features (feature, activation) on the map's grid."""
        return sae_views.features_json(self._sae_grid(request_id, sae), k)

    def sae_feature(self, request_id: str, sae: str, feature: int, top: int = 8) -> dict:
        """One feature's map on the image and its top-activating cells over the SAE's cached images."""
        grid = self._sae_grid(request_id, sae)
        loaded = self.model(self.trace(request_id).model_name)
        return sae_views.feature_json(loaded, self._sae(loaded, sae), grid, feature, top)

    def sae_steer(self, request_id: str, sae: str, scales: dict | None = None, values: dict | None = None,
                  cells=None, token_index: int = 0) -> dict:
        """The request answered again with SAE features scaled (0 zeroes one) or clamped to `values` at the SAE's
        hook (on `cells` of the grid only, if given): a new request (`request_id` in the result) whose maps, by
        every method, are the edited model's; with the attention and TAM maps of answer token `token_index`
        before and after (after: the same index, or the steered answer's last token if it is shorter)."""
        trace = self.trace(request_id)
        trace.check_token_index(token_index)
        if trace.feature_edit:
            raise UserInputError("this answer was generated with features edited already: steer the original "
                                 "request")
        request = self.request(request_id)
        edit = FeatureEdit.make(sae, scales, values, cells)
        steered_id, steered = self.generate(list(request.images), request.prompt, request.model, request.options,
                                            feature_edit=edit)
        steered_token = min(token_index, steered.n_answer - 1)
        maps = {method: {"before": self.explain(request_id, method, token_index).maps[0],
                         "after": self.explain(steered_id, method, steered_token).maps[0]}
                for method in sae_views.STEER_MAP_METHODS}
        return sae_views.steer_json(edit, trace, steered_id, steered, token_index, steered_token, maps)

    def _sae(self, loaded: LoadedModel, name: str):
        if name not in self.saes:
            raise UserInputError(f"unknown SAE {name!r}: this service offers {', '.join(sorted(self.saes))}")
        with self._model_lock:
            if (loaded.name, name) not in self._saes:
                self._saes[(loaded.name, name)] = load_sae_for(loaded, self.saes[name])
            return self._saes[(loaded.name, name)]

    def _sae_grid(self, request_id: str, sae: str):
        return self._computed(("sae", request_id, sae), request_id,
                              lambda loaded, trace: sae_views.request_features(loaded, self._sae(loaded, sae), trace),
                              lambda grid, trace: grid.activations.nbytes)

    def _computed(self, key, request_id: str, compute, nbytes):
        """`compute(loaded, trace)` for the request, under the limits, cached under `key` with its size
        `nbytes(result, trace)` (plus a little for the object)."""
        cached = self._cache.get(key)
        if cached is None:
            trace = self.trace(request_id)
            loaded = self.model(trace.model_name)
            with self._limits(loaded), self._edited(loaded, trace):
                cached = compute(loaded, trace)
            self._cache.put(key, cached, nbytes(cached, trace) + 1024)
        return cached

    def _run(self, request: Request) -> Trace:
        loaded = self.model(request.model)
        with self._limits(loaded):
            if request.feature_edit is not None:
                return generate_edited(loaded, self._sae(loaded, request.feature_edit.sae), list(request.images),
                                       request.prompt, request.feature_edit, request.options)
            return generate_with_capture(loaded, list(request.images), request.prompt, request.options)

    def _edited(self, loaded: LoadedModel, trace: Trace):
        """The feature edit a trace was generated with, applied again while a method runs the model on it (a
        no-op for other traces), so that its maps explain the edited model's answer."""
        if not trace.feature_edit:
            return contextlib.nullcontext()
        edit = FeatureEdit.from_json(trace.feature_edit)
        return editing(loaded, self._sae(loaded, edit.sae), edit, trace.images)

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
    hours = limits.get("share_link_hours")
    return ExplainService(default_model=model if model in allowed else allowed[0],
                          cache_bytes=limits["cache_mb"] * 2 ** 20, allowed_models=allowed,
                          share_lifetime_s=None if hours is None else hours * 3600,
                          max_new_tokens=limits["max_new_tokens"], timeout_s=limits["timeout_s"], **load_options)
