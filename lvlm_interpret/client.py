"""A front end's view of a remote service (`python -m lvlm_interpret serve`): the same calls as ExplainService.

A backend that restarted (or forgot a request) no longer knows the front end's request ids: the client then
regenerates the request from the inputs it kept and goes on, as the service does for an evicted Trace.
"""

from __future__ import annotations

import contextlib
import io
import json
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from . import notebook
from .analysis.ablation import AblationResult
from .analysis.knockout import WINDOWS, KnockoutResult
from .analysis.logit_lens import LogitLens
from .capture import GenerationOptions
from .errors import ServiceBusyError, UnknownRequestError, UserInputError
from .families.base import ImageLayout
from .images import decode_image
from .methods.base import Explanation
from .methods.visual_relevance import VisualRelevance
from .progress import current_reporter
from .backend import ShareLink, SharedRequest
from .service import ByteBoundedCache, check_share_id
from .trace import AnswerPositions


KEEPALIVE_S = 4.0  # below the backend's keep-alive timeout
JOB_POLL_S = 0.25  # how often a waiting explain call reads its job's progress


@dataclass
class RemoteTrace(AnswerPositions):
    """The parts of a Trace a front end shows (a TraceView)."""

    request_id: str
    model_name: str
    prompt: str
    answer: str
    answer_texts: list[str]
    answer_ids: list[int]
    images: list[ImageLayout]
    n_layers: int
    n_heads: int
    answer_logprobs: list[float] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    prompt_length: int = 0

    @property
    def n_answer(self) -> int:
        return len(self.answer_ids)

    def __repr__(self) -> str:
        return notebook.trace_repr(self)

    def _repr_html_(self) -> str:
        return notebook.trace_html(self)


def _refusal(response: httpx.Response) -> UserInputError:
    """The backend's one-line message as the matching error (503 busy, 404 unknown request, else refused)."""
    try:
        message = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        message = f"the backend failed ({response.status_code}); try again"
    if response.status_code == 503:
        return ServiceBusyError(message)
    if response.status_code == 404:
        return UnknownRequestError(message)
    return UserInputError(message)


@dataclass
class _RemoteRequest:
    trace: RemoteTrace
    inputs: dict  # the generate call's files and form, to regenerate it
    backend_id: str  # the id the backend knows it by now


def _generate_inputs(image, prompt: str, model: str | None, options: GenerationOptions) -> dict:
    """The /v1/generate call's files and form for these inputs."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    form = {"prompt": prompt, "max_new_tokens": str(options.max_new_tokens),
            "temperature": str(options.temperature if options.do_sample else 0), "top_p": str(options.top_p),
            "seed": str(options.seed), **({"model": model} if model else {})}
    return {"files": {"image": ("image.png", buffer.getvalue(), "image/png")}, "data": form}


class RemoteService:
    def __init__(self, url: str | None = None, client: httpx.Client | None = None, timeout_s: float = 300.0,
                 requests_bytes: int = 64 << 20):
        """Requests (answer and uploaded PNG) are kept, least recently used first out, within `requests_bytes`."""
        # connections are reused, but dropped before the backend's own idle limit (uvicorn's 5 s): a request sent on
        # one the backend is closing failed ("cannot be reached", RemoteProtocolError) under load
        self._client = client or httpx.Client(base_url=url, timeout=timeout_s, limits=httpx.Limits(
            max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_S))
        self._requests = ByteBoundedCache(requests_bytes)
        health = self._call("GET", "/v1/health")
        self.default_model = health["default_model"]
        self.allowed_models: list[str] = health["models"]  # the backend answers with these and no other
        self.max_new_tokens: int | None = health.get("max_new_tokens")

    def _send(self, verb: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._client.request(verb, path, **kwargs)
        except httpx.HTTPError as error:
            raise ServiceBusyError(f"the backend at {self._client.base_url} cannot be reached "
                                   f"({type(error).__name__}): it may be restarting; retry in a moment") from None
        if response.status_code != 200:
            raise _refusal(response)
        return response

    def _call(self, verb: str, path: str, **kwargs) -> dict:
        return self._send(verb, path, **kwargs).json()

    def _for_request(self, request_id: str, send):
        """`send(backend_id)`; if the backend no longer knows the request, regenerate it there once and resend."""
        request = self._request(request_id)
        try:
            return send(request.backend_id)
        except UnknownRequestError:
            try:
                summary = self._call("POST", "/v1/generate", **request.inputs)
            except ServiceBusyError:
                raise
            except UserInputError as error:  # e.g. restarted with other models
                raise UserInputError(f"the backend was restarted and no longer takes this request ({error}): "
                                     "generate again") from None
            if summary["answer_ids"] != request.trace.answer_ids:
                raise UserInputError("the backend was restarted and now answers differently: generate again") \
                    from None
            request.backend_id = summary["request_id"]
            return send(request.backend_id)

    def _request(self, request_id: str) -> _RemoteRequest:
        request = self._requests.get(request_id)
        if request is None:
            raise UnknownRequestError("unknown or expired request: generate an answer first")
        return request

    def generate(self, images, prompt: str, model: str | None = None, options: GenerationOptions | None = None):
        if len(images) != 1:
            raise UserInputError("the HTTP backend takes one image per request")
        if model is not None and model not in self.allowed_models:
            raise UserInputError(f"model {model!r} is not offered by the backend; choose one of "
                                 f"{', '.join(self.allowed_models)}")
        inputs = _generate_inputs(images[0], prompt, model, options or GenerationOptions())
        return self._remember(self._call("POST", "/v1/generate", **inputs), inputs)

    def _remember(self, summary: dict, inputs: dict) -> tuple[str, RemoteTrace]:
        """Keep the request the backend answered with `summary`, with the generate call's `inputs` (to regenerate
        it should the backend forget it)."""
        trace = RemoteTrace(
            request_id=summary["request_id"], model_name=summary["model"], prompt=summary["prompt"],
            answer=summary["answer"], answer_texts=summary["answer_texts"], answer_ids=summary["answer_ids"],
            images=[ImageLayout.from_json(layout) for layout in summary["images"]], n_layers=summary["n_layers"],
            n_heads=summary["n_heads"], answer_logprobs=summary["answer_logprobs"],
            token_texts=summary["token_texts"], prompt_length=summary["prompt_length"],
        )
        self._requests.put(trace.request_id, _RemoteRequest(trace, inputs, trace.request_id),
                           len(inputs["files"]["image"][1]) + 4096)
        return trace.request_id, trace

    def share(self, request_id: str) -> ShareLink:
        body = self._for_request(request_id, lambda backend_id: self._call(
            "POST", "/v1/share", json={"request_id": backend_id}))
        return ShareLink(body["share_id"], body["expires_at"])

    def open_shared(self, share_id: str) -> SharedRequest:
        check_share_id(share_id)  # an id from a URL goes into a path only in its own alphabet
        summary = self._call("GET", f"/v1/share/{share_id}")
        image = decode_image(io.BytesIO(self._send("GET", f"/v1/share/{share_id}/image").content), "the shared image")
        options = GenerationOptions(**summary["options"])
        request_id, trace = self._remember(summary, _generate_inputs(image, summary["prompt"], summary["model"],
                                                                     options))
        return SharedRequest(request_id, trace, [image], options)

    def trace(self, request_id: str) -> RemoteTrace:
        return self._request(request_id).trace

    def attention_overview(self, request_id: str, token_index: int) -> dict[str, np.ndarray]:
        body = self._for_request(request_id, lambda backend_id: self._call(
            "GET", f"/v1/attention-overview/{backend_id}/{token_index}"))
        return {name: np.asarray(values, dtype=np.float32) for name, values in body.items()}

    def reverse_attention(self, request_id: str, cells, layers="all", heads="all", aggregation="mean") -> np.ndarray:
        body = self._for_request(request_id, lambda backend_id: self._call("POST", "/v1/reverse-attention", json={
            "request_id": backend_id, "cells": [list(cell) for cell in cells], "layers": str(layers),
            "heads": str(heads), "aggregation": aggregation}))
        return np.asarray(body["scores"], dtype=np.float32)

    def visual_relevance(self, request_id: str, threshold: float = 1.0) -> VisualRelevance:
        body = self._for_request(request_id, lambda backend_id: self._call(
            "GET", f"/v1/visual-relevance/{backend_id}", params={"threshold": threshold}))
        return VisualRelevance(llr=body["llr"], logprob_image=[], logprob_blurred=[], relevant=body["relevant"])

    def trust(self, request_id: str, token_index: int, options: dict | None = None) -> dict:
        return self._for_request(request_id, lambda backend_id: self._call(
            "GET", f"/v1/trust/{backend_id}/{token_index}", params={"options": json.dumps(options or {})}))

    def compare(self, request_a: str, request_b: str, methods=("attention", "relevancy", "tam"),
                options: dict | None = None) -> dict:
        """lvlm_interpret.compare.compare_requests computed by the backend in one call (compare.json)."""
        return self._for_request(request_a, lambda backend_a: self._for_request(request_b, lambda backend_b: self._call(
            "POST", "/v1/compare", json={"request_a": backend_a, "request_b": backend_b, "methods": list(methods),
                                         "options": options or {}})))

    # --- the analyses, run by the backend next to its model ---------------------------------------------------
    def logit_lens(self, request_id: str, k: int = 5) -> LogitLens:
        return LogitLens.from_json(self._for_request(request_id, lambda backend_id: self._call(
            "POST", "/v1/logit-lens", json={"request_id": backend_id, "k": k})))

    def analysis_tokens(self, request_id: str, kind: str, token_index: int = 0, **selection) -> list[int]:
        return self._for_request(request_id, lambda backend_id: self._call("POST", "/v1/analysis-tokens", json={
            "request_id": backend_id, "kind": kind, "token_index": token_index, **selection}))["positions"]

    def ablate(self, request_id: str, positions: list[int], token_index: int = 0,
               replacement: str = "mean") -> AblationResult:
        return AblationResult.from_json(self._for_request(request_id, lambda backend_id: self._call(
            "POST", "/v1/ablate", json={"request_id": backend_id, "positions": list(positions),
                                        "token_index": token_index, "replacement": replacement})))

    def sae_features(self, request_id: str, sae: str = "demo", k: int = 10) -> dict:
        return self._for_request(request_id, lambda backend_id: self._call(
            "POST", "/v1/sae/features", json={"request_id": backend_id, "sae": sae, "k": k}))

    def sae_feature(self, request_id: str, sae: str, feature: int, top: int = 8) -> dict:
        return self._for_request(request_id, lambda backend_id: self._call(
            "POST", "/v1/sae/feature", json={"request_id": backend_id, "sae": sae, "feature": feature, "top": top}))

    def sae_steer(self, request_id: str, sae: str, scales: dict | None = None, values: dict | None = None,
                  cells=None, token_index: int = 0) -> dict:
        """As ExplainService.sae_steer; the result's `request_id` names the steered request on the backend."""
        return self._for_request(request_id, lambda backend_id: self._call(
            "POST", "/v1/sae/steer", json={
                "request_id": backend_id, "sae": sae, "scales": {str(k): v for k, v in (scales or {}).items()},
                "values": {str(k): v for k, v in (values or {}).items()}, "token_index": token_index,
                "cells": None if cells is None else [list(cell) for cell in cells]}))

    def knockout(self, request_id: str, positions: list[int], token_index: int = 0,
                 windows=tuple(WINDOWS)) -> KnockoutResult:
        return KnockoutResult.from_json(self._for_request(request_id, lambda backend_id: self._call(
            "POST", "/v1/knockout", json={"request_id": backend_id, "positions": list(positions),
                                          "token_index": token_index, "windows": list(windows)})))

    def export(self, request_id: str, token_index: int, kind: str, folder, options: dict | None = None) -> list[Path]:
        """Fetch an export from the backend and unpack it into `folder` (file names only, no paths)."""
        response = self._for_request(request_id, lambda backend_id: self._send(
            "GET", f"/v1/export/{backend_id}/{token_index}/{kind}", params={"options": json.dumps(options or {})}))
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
            for name in archive.namelist():
                path = folder / Path(name).name
                path.write_bytes(archive.read(name))
                paths.append(path)
        return paths

    def _explained(self, path: str, body: dict) -> dict:
        """POST an explain call; inside `reporting_progress` it runs as a job whose steps are polled and passed on
        to the reporter, and a reporter that raises (the page's Cancel) stops the job on the backend."""
        report = current_reporter()
        if report is None:
            return self._call("POST", path, json=body)
        job = uuid.uuid4().hex
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(self._call, "POST", path, json={**body, "job": job})
            while True:
                try:
                    return answer.result(timeout=JOB_POLL_S)
                except FutureTimeout:
                    pass
                try:
                    status = self._call("GET", f"/v1/jobs/{job}")
                except UserInputError:  # not started yet, or just ended: the answer says which
                    continue
                if status["total"] == 0:  # not started its first step
                    continue
                try:  # at every poll, not only on a new step: a Cancel pressed now stops the job at its next step
                    report(status["done"], status["total"])
                except BaseException:
                    with contextlib.suppress(UserInputError):
                        self._call("POST", f"/v1/jobs/{job}/cancel")
                    raise

    def explain_answer(self, request_id: str, method: str = "igos", **options) -> Explanation:
        body = self._for_request(request_id, lambda backend_id: self._explained("/v1/explain_answer", {
            "request_id": backend_id, "method": method, "options": options}))
        return Explanation(method=body["method"], token_index=body["token_index"],
                           maps=[np.asarray(grid, dtype=np.float32) for grid in body["maps"][body["method"]]],
                           details=body["details"])

    def explain(self, request_id: str, method: str, token_index: int, **options) -> Explanation:
        body = self._for_request(request_id, lambda backend_id: self._explained("/v1/explain", {
            "request_id": backend_id, "method": method, "token_index": token_index, "options": options}))
        maps = {name: [np.asarray(grid, dtype=np.float32) for grid in grids] for name, grids in body["maps"].items()}
        prefix = method + "_"
        return Explanation(
            method=method, token_index=token_index, maps=maps.pop(method),
            text_scores=None if body["text_scores"] is None else np.asarray(body["text_scores"], dtype=np.float32),
            variants={name[len(prefix):]: grids for name, grids in maps.items()},
            details=body["details"],
        )
