"""The service over HTTP (FastAPI; OpenAPI schema at /docs and /openapi.json).

`python -m lvlm_interpret serve --host 127.0.0.1 --port 8000` starts it alone; `python app.py --backend URL`
points a web front end at it, so a CPU-only front end can use a GPU machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import threading
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import FastAPI, File, Form, UploadFile
from fastapi import Path as PathParameter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .analysis.ablation import REPLACEMENTS
from .analysis.knockout import WINDOWS
from .analysis.token_sets import KINDS as TOKEN_SETS
from .capture import MAX_SEED, GenerationOptions
from .compare import DEFAULT_METHODS as DEFAULT_COMPARED_METHODS
from .compare import compare_requests
from .errors import ServiceBusyError, TooLargeError, UnknownRequestError, UserInputError
from .export import EXPORT_KINDS, answer_record
from .images import MAX_PIXELS, decode_image
from .methods import METHODS
from .methods.attention import AGGREGATIONS
from .progress import reporting_progress
from .ratelimit import RateLimiter
from .service import ExplainService, hosted_limits, hosted_service

MAX_UPLOAD_BYTES = 20 * 2 ** 20
RETRY_AFTER_S = 5
FORM_OVERHEAD_BYTES = 64 * 2 ** 10  # the prompt and options around the image
# memory an upload takes per pixel while it is decoded and answered: the decoded RGB plus the copies made turning it
# upright, converting it and in the model's processor (about 14 measured on a 16-megapixel PNG)
DECODE_BYTES_PER_PIXEL = 16
UNLIMITED_PATHS = ("/v1/health",)  # liveness answers whatever a client's rate
UNLIMITED_PREFIXES = ("/v1/jobs/",)  # nor do a running job's status and cancel: a waiting client polls them
log = logging.getLogger(__name__)

# the fixed lists the server accepts, from the registries (enums in the schema)
MethodName = Literal[tuple(sorted(METHODS))]
ExportKind = Literal[EXPORT_KINDS]
TokenSet = Literal[TOKEN_SETS]
Replacement = Literal[REPLACEMENTS]
Aggregation = Literal[AGGREGATIONS]
TokenIndex = Annotated[int, PathParameter(ge=0)]


class Jobs:
    """The explain calls that name a job, while they run: the steps done (iGOS++'s iterations) and whether a client
    asked to stop it (the method then stops after its current step and caches nothing)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: dict[str, dict] = {}

    @contextlib.contextmanager
    def running(self, job: str | None):
        if job is None:
            yield
            return
        state = {"done": 0, "total": 0, "cancel": False}
        with self._lock:
            if job in self._running:
                raise UserInputError(f"job {job} is already running: name each call's job afresh")
            self._running[job] = state

        def report(done: int, total: int) -> None:
            with self._lock:
                state.update(done=done, total=total)
                cancel = state["cancel"]
            if cancel:
                raise UserInputError(f"cancelled after step {done} of {total}: ask again to start it over")
        try:
            with reporting_progress(report):
                yield
        finally:
            with self._lock:
                del self._running[job]

    def status(self, job: str) -> dict:
        with self._lock:
            state = self._running.get(job)
            if state is None:
                raise UnknownRequestError(f"no running job {job} (it has not started, has ended, or never was)")
            return {"job": job, "done": state["done"], "total": state["total"], "cancelling": state["cancel"]}

    def cancel(self, job: str) -> dict:
        with self._lock:
            if job in self._running:
                self._running[job]["cancel"] = True
        return self.status(job)


class Admission:
    """At most `concurrency` requests compute at once and `queue` more wait (each at most `wait_s`); any
    further request is refused at once, so a crowd gets "busy, retry" instead of piling up threads."""

    def __init__(self, concurrency: int = 1, queue: int = 16, wait_s: float = 60.0):
        self.limit = concurrency + queue
        self.wait_s = wait_s
        self.admitted = 0
        self._slots = threading.Semaphore(concurrency)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self):
        with self._lock:
            if self.admitted >= self.limit:
                raise ServiceBusyError(f"the server is busy ({self.admitted} requests in progress): retry in a few "
                                       "seconds")
            self.admitted += 1
        try:
            if not self._slots.acquire(timeout=self.wait_s):
                raise ServiceBusyError(f"the server is busy (waited {self.wait_s:g} s for a free slot): retry in a "
                                       "few seconds")
            try:
                yield
            finally:
                self._slots.release()
        finally:
            with self._lock:
                self.admitted -= 1


class ImageBudget:
    """Uploads are decoded within a pixel budget (each) and a memory budget (all at once): the size an image
    declares in its header is checked before any pixel is decoded, and an image waits (at most `wait_s`) until
    the images in flight leave room for it, estimated at DECODE_BYTES_PER_PIXEL."""

    def __init__(self, max_pixels: int = MAX_PIXELS, memory_bytes: int | None = None, wait_s: float = 60.0):
        self.max_pixels = max_pixels if memory_bytes is None else min(max_pixels,
                                                                      memory_bytes // DECODE_BYTES_PER_PIXEL)
        self.memory_bytes = memory_bytes
        self.wait_s = wait_s
        self.in_use = 0
        self._freed = threading.Condition()

    @contextlib.contextmanager
    def decoded(self, data: bytes, name: str):
        """The upload `data` as an RGB picture, its memory reserved until the block ends."""
        width, height = self._declared_size(data, name)
        if width * height > self.max_pixels:
            raise TooLargeError(f"the image is too large ({width}x{height} pixels): {self._limit()}")
        reserved = width * height * DECODE_BYTES_PER_PIXEL
        if self.memory_bytes is not None:
            with self._freed:
                if not self._freed.wait_for(lambda: self.in_use + reserved <= self.memory_bytes, self.wait_s):
                    raise ServiceBusyError("the server is busy decoding other images: retry in a few seconds")
                self.in_use += reserved
        try:
            yield decode_image(io.BytesIO(data), name)
        finally:
            if self.memory_bytes is not None:
                with self._freed:
                    self.in_use -= reserved
                    self._freed.notify_all()

    def _limit(self) -> str:
        return f"upload one of at most {self.max_pixels / 1e6:g} megapixels"

    def _declared_size(self, data: bytes, name: str) -> tuple[int, int]:
        try:
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                return header.size
        except Image.DecompressionBombError:
            raise TooLargeError(f"the image is too large: {self._limit()}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            decode_image(io.BytesIO(data), name)  # raises the message saying what is wrong with the file
            raise


class LimitBodySize:
    """ASGI middleware: a request body over `max_bytes` gets 413, from its declared length before any of it is
    received, else (a chunked body, no Content-Length) as soon as the bytes received pass the cap, so no more than
    the cap is ever read, held or spooled to disk."""

    def __init__(self, app, max_bytes: int, message: str):
        self.app = app
        self.max_bytes = max_bytes
        self.message = message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_large(self.message)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise StarletteHTTPException(413)  # the endpoint's exception handler answers it
            return message

        await self.app(scope, counted, send)


class LimitRate:
    """ASGI middleware: a client (by address) over the limiter's rate gets 429 with Retry-After."""

    def __init__(self, app, limiter: RateLimiter):
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in UNLIMITED_PATHS \
                and not scope["path"].startswith(UNLIMITED_PREFIXES):
            wait_s = self.limiter.retry_after(scope["client"][0] if scope.get("client") else "unknown")
            if wait_s is not None:
                return await JSONResponse(status_code=429, content={"error": self.limiter.message(wait_s)},
                                          headers={"Retry-After": str(wait_s)})(scope, receive, send)
        await self.app(scope, receive, send)


def too_large(message: str) -> JSONResponse:
    # closing the connection stops the rest of the body being received only to be thrown away
    return JSONResponse(status_code=413, content={"error": message}, headers={"Connection": "close"})


def refusal(error: UserInputError) -> JSONResponse:
    """A refused request's answer: 503 busy (with Retry-After), 413 too large, 404 unknown request, else 400."""
    if isinstance(error, ServiceBusyError):
        return JSONResponse(status_code=503, content={"error": str(error)}, headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(error, TooLargeError):
        return too_large(str(error))
    return JSONResponse(status_code=404 if isinstance(error, UnknownRequestError) else 400,
                        content={"error": str(error)})


class ErrorBody(BaseModel):
    """Every refusal and failure: one line saying what went wrong and what to change."""
    error: str


REFUSALS = {
    400: "bad input (a field, the image or an option): the message says what to change",
    404: "unknown or expired request id (generate the answer again) or share link (ask for a new one)",
    413: "the upload is over the size limit, in bytes or in pixels",
    429: "too many requests from this address: retry after Retry-After seconds",
    500: "internal error (logged on the server)",
    503: "busy, out of memory or over the time limit: retry after Retry-After seconds",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                               "schema": {"type": "integer"}}}


def refusals(*codes: int) -> dict:
    """OpenAPI responses for these error statuses: their body is ErrorBody."""
    return {code: {"model": ErrorBody, "description": REFUSALS[code], **(
        {"headers": RETRY_AFTER} if code in (429, 503) else {})} for code in codes}


class ReverseRequest(BaseModel):
    request_id: str
    cells: list[tuple[int, int]]
    layers: str = "all"
    heads: str = "all"
    aggregation: Aggregation = "mean"


class ShareRequest(BaseModel):
    request_id: str


JOB_ID = r"^[A-Za-z0-9_-]{16,64}$"  # a client-made random id: knowing it is what lets a client see or stop the job
JobId = Annotated[str, PathParameter(pattern=JOB_ID)]
JOB_FIELD = Field(None, pattern=JOB_ID, description=(
    "optional: an id of the client's making (16-64 letters, digits, - or _; random, e.g. a uuid4's hex) under "
    "which GET /v1/jobs/{job} reports a slow method's progress and POST /v1/jobs/{job}/cancel stops it"))


class ExplainRequest(BaseModel):
    request_id: str
    method: MethodName = "attention"
    token_index: int = Field(ge=0)
    options: dict = Field(default_factory=dict)
    job: str | None = JOB_FIELD


AnswerMethodName = Literal[tuple(sorted(name for name, method in METHODS.items() if hasattr(method, "explain_answer")))]


class AnswerMapRequest(BaseModel):
    request_id: str
    method: AnswerMethodName = "igos"
    options: dict = Field(default_factory=dict)
    job: str | None = JOB_FIELD


class LogitLensRequest(BaseModel):
    request_id: str
    k: int = 5


class TokenSetRequest(BaseModel):
    """A token set of the first image (lvlm_interpret.analysis.token_sets.select_tokens, but a box, not a mask)."""
    model_config = ConfigDict(extra="forbid")
    request_id: str
    kind: TokenSet
    token_index: int = Field(0, ge=0)
    box: list[float | str] | None = None
    buffer: int = 0
    k: int | None = None
    seed: int = 0
    method: MethodName | None = None


class AblationRequest(BaseModel):
    request_id: str
    positions: list[int]
    token_index: int = Field(0, ge=0)
    replacement: Replacement = "mean"


class KnockoutRequest(BaseModel):
    request_id: str
    positions: list[int]
    token_index: int = Field(0, ge=0)
    windows: list[str] = Field(default_factory=lambda: list(WINDOWS), description=(
        f"layer windows: {', '.join(WINDOWS)} (fractions of the depth) or a layer range like 2-5"))


class SAEFeaturesRequest(BaseModel):
    request_id: str
    sae: str = "demo"
    k: int = Field(10, ge=1, le=100)


class SAEFeatureRequest(BaseModel):
    request_id: str
    sae: str = "demo"
    feature: int = Field(..., ge=0)
    top: int = Field(8, ge=0, le=64)


class SAESteerRequest(BaseModel):
    request_id: str
    sae: str = "demo"
    scales: dict[int, float] = Field(default_factory=dict, description="feature -> factor (0 zeroes it)")
    values: dict[int, float] = Field(default_factory=dict, description="feature -> activation it is clamped to")
    cells: list[tuple[int, int]] | None = Field(None, description="[row, col] cells of the grid to edit (default: "
                                                                  "every cell of the first image)")
    token_index: int = Field(0, ge=0, description="the answer token whose maps are returned before and after")


class CompareRequest(BaseModel):
    """Two generated requests (B made from A by changing its prompt, image or model) and the methods whose maps
    are compared."""
    request_a: str
    request_b: str
    methods: list[MethodName] = Field(default_factory=lambda: list(DEFAULT_COMPARED_METHODS))
    options: dict = Field(default_factory=dict, description="the methods' options, {\"cleann\": {\"head\": 0}}")


def method_options(text: str) -> dict:
    """The methods' options sent as a JSON query parameter."""
    try:
        return json.loads(text)
    except ValueError:
        raise UserInputError("options must be JSON, e.g. {\"cleann\": {\"head\": 0}}") from None


def trace_summary(request_id: str, trace) -> dict:
    """What a front end needs about a generation (no tensors): result.json's answer record, and what a TraceView
    reads."""
    return {
        "request_id": request_id,
        **answer_record(trace),
        "answer_texts": trace.answer_texts,
        "token_texts": trace.token_texts,
        "prompt_length": trace.prompt_length,
        "answer_ids": trace.answer_ids,
        "images": [layout.to_json() for layout in trace.images],
        "n_layers": trace.n_layers,
        "n_heads": trace.n_heads,
    }


def explanation_json(explanation) -> dict:
    return {
        "method": explanation.method,
        "token_index": explanation.token_index,
        "maps": {name: [grid.tolist() for grid in grids] for name, grids in explanation.all_maps().items()},
        "text_scores": None if explanation.text_scores is None else explanation.text_scores.tolist(),
        "details": _plain(explanation.details),
    }


def _plain(value):
    """JSON-safe copy of method details (numpy values become Python ones)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def upload_message(max_bytes: int) -> str:
    return f"the upload is larger than {max_bytes / 2 ** 20:g} MB: upload a smaller file"


def read_upload(file, max_bytes: int = MAX_UPLOAD_BYTES) -> bytes:
    data = file.read(max_bytes + 1)
    if not data:
        raise UserInputError("the uploaded image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise TooLargeError(upload_message(max_bytes))
    return data


def create_api(service: ExplainService, admission: Admission | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, images: ImageBudget | None = None,
               rate_limiter: RateLimiter | None = None) -> FastAPI:
    """Errors are JSON `{"error": one line}`: 400 bad input, 404 unknown request id or endpoint, 413 upload too
    large (bytes or pixels), 429 too many requests from one address (with `rate_limiter`; with Retry-After), 503
    busy (with Retry-After), 500 anything else (logged here; the client sees no trace or path). Uploads are read
    and decoded only once admitted, within `images`' pixel and memory budget."""
    admission = admission or Admission()
    images = images or ImageBudget(wait_s=admission.wait_s)
    everywhere = (413, 429, 500) if rate_limiter else (413, 500)
    api = FastAPI(title="lvlm_interpret", version="1", responses=refusals(*everywhere),
                  description="Generate with capture, then explain any answer token with any registered method.")
    api.add_middleware(LimitBodySize, max_bytes=max_upload_bytes + FORM_OVERHEAD_BYTES,
                       message=upload_message(max_upload_bytes))
    if rate_limiter:
        api.add_middleware(LimitRate, limiter=rate_limiter)  # added last, so it runs first

    @api.exception_handler(UserInputError)
    async def user_error(request, error: UserInputError):
        return refusal(error)

    @api.exception_handler(RequestValidationError)
    async def invalid_fields(request, error: RequestValidationError):
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if part not in ("body", "query", "path"))
        if first["type"] == "literal_error":  # a value outside a fixed list
            message = f"unknown {field} {first['input']!r}: choose one of {first['ctx']['expected']}"
        else:
            message = f"{field or 'request'}: {first['msg']}"
        return JSONResponse(status_code=400, content={"error": message})

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        if error.status_code == 413:
            return too_large(upload_message(max_upload_bytes))
        message = "no such endpoint: see /docs for the API" if error.status_code == 404 else str(error.detail)
        return JSONResponse(status_code=error.status_code, content={"error": message}, headers=error.headers)

    @api.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        log.exception("request %s failed", request.url.path)
        return JSONResponse(status_code=500, content={"error": "internal error (logged on the server); try again"})

    def openapi() -> dict:
        """FastAPI's schema without its 422 responses: a request that fails validation gets 400 here."""
        if api.openapi_schema is None:
            schema = FastAPI.openapi(api)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return api.openapi_schema

    api.openapi = openapi

    # a request names one of these (over the network, never an arbitrary hub id or local folder)
    offered_models = service.allowed_models or [service.default_model]
    jobs = Jobs()

    @api.get("/v1/health")
    def health() -> dict:
        """Liveness, plus the figures an operator watches: bytes held for requests and requests in progress."""
        return {"status": "ok", "default_model": service.default_model, "models": offered_models,
                "max_new_tokens": service.max_new_tokens, "memory": service.memory(),
                "in_progress": admission.admitted}

    @api.get("/v1/methods")
    def methods() -> dict:
        return {name: method.description for name, method in sorted(METHODS.items())}

    @api.post("/v1/generate", responses=refusals(400, 503))
    def generate(image: UploadFile = File(...), prompt: str = Form(...),
                 max_new_tokens: int = Form(32, json_schema_extra={"minimum": 1,
                                                                   "maximum": service.max_new_tokens or 1024}),
                 temperature: float = Form(0.0, json_schema_extra={"anyOf": [{"const": 0}, {"minimum": 0.01,
                                                                                             "maximum": 10}]}),
                 top_p: float = Form(1.0, json_schema_extra={"exclusiveMinimum": 0, "maximum": 1}),
                 seed: int = Form(0, json_schema_extra={"minimum": 0, "maximum": MAX_SEED}),
                 model: str | None = Form(None, json_schema_extra={"enum": offered_models})) -> dict:
        """Greedy when temperature is 0, else sampled with `top_p` and `seed`; `model`: one of /v1/health's
        `models` (default: its `default_model`). (The ranges in the schema are checked by GenerationOptions and the
        service, which word the messages.)"""
        options = GenerationOptions.from_temperature(max_new_tokens, temperature, top_p, seed)
        options.validate()  # before the request waits for a slot
        if model is not None and model not in offered_models:
            raise UserInputError(f"model {model!r} is not offered here; choose one of {', '.join(offered_models)}")
        with admission.slot():  # nothing is read or decoded before: waiting requests hold only the spooled file
            data = read_upload(image.file, max_upload_bytes)
            with images.decoded(data, "the uploaded file") as picture:
                request_id, trace = service.generate([picture], prompt, model=model, options=options)
        return trace_summary(request_id, trace)

    @api.get("/v1/visual-relevance/{request_id}", responses=refusals(400, 404, 503))
    def visual_relevance(request_id: str, threshold: float = 1.0) -> dict:
        with admission.slot():
            relevance = service.visual_relevance(request_id, threshold)
        return {"llr": relevance.llr, "relevant": relevance.relevant}

    @api.get("/v1/attention-overview/{request_id}/{token_index}", responses=refusals(400, 404, 503))
    def overview(request_id: str, token_index: TokenIndex) -> dict:
        with admission.slot():
            masses = service.attention_overview(request_id, token_index)
        return {name: values.tolist() for name, values in masses.items()}

    @api.post("/v1/reverse-attention", responses=refusals(400, 404, 503))
    def reverse(body: ReverseRequest) -> dict:
        with admission.slot():
            scores = service.reverse_attention(body.request_id, body.cells, body.layers, body.heads, body.aggregation)
        return {"scores": scores.tolist()}

    @api.get("/v1/trust/{request_id}/{token_index}", responses=refusals(400, 404, 503))
    def trust(request_id: str, token_index: TokenIndex, options: str = "{}") -> dict:
        """Which map to believe for the token: every map's deletion / insertion AUC, the agreement of every pair
        of maps (Spearman, IoU of the top 10% cells), the image share of relevancy and a verdict; `options` as for
        exports."""
        with admission.slot():
            return service.trust(request_id, token_index, method_options(options))

    @api.get("/v1/export/{request_id}/{token_index}/{kind}", response_class=Response, responses={
        200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}},
        **refusals(400, 404, 503)})
    def export(request_id: str, token_index: TokenIndex, kind: ExportKind, options: str = "{}") -> Response:
        """A zip of one export: png (the token's maps), request (result.json + maps.npz) or report (HTML);
        `options`: the methods' options as JSON, {"cleann": {"head": 0}}."""
        with tempfile.TemporaryDirectory(prefix="lvlm-export-") as folder, admission.slot():
            paths = service.export(request_id, token_index, kind, folder, method_options(options))
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in paths:
                    archive.write(path, arcname=Path(path).name)
        return Response(buffer.getvalue(), media_type="application/zip")

    @api.post("/v1/explain", responses=refusals(400, 404, 503))
    def explain(body: ExplainRequest) -> dict:
        with jobs.running(body.job), admission.slot():
            explanation = service.explain(body.request_id, body.method, body.token_index, **body.options)
        return explanation_json(explanation)

    @api.post("/v1/explain_answer", responses=refusals(400, 404, 503))
    def explain_answer(body: AnswerMapRequest) -> dict:
        """A method's one map for the whole answer (igos: its visually relevant tokens together)."""
        with jobs.running(body.job), admission.slot():
            explanation = service.explain_answer(body.request_id, body.method, **body.options)
        return explanation_json(explanation)

    @api.get("/v1/jobs/{job}", responses=refusals(400, 404))
    def job_status(job: JobId) -> dict:
        """A running explain call's progress: the steps `done` of `total` (0 of 0 until a slow method's first step,
        and for a fast one); 404 once it has ended."""
        return jobs.status(job)

    @api.post("/v1/jobs/{job}/cancel", responses=refusals(400, 404))
    def job_cancel(job: JobId) -> dict:
        """Stop a running explain call after its current step: it answers 400 "cancelled ..." and caches nothing;
        404 if it is not running."""
        return jobs.cancel(job)

    @api.post("/v1/compare", responses=refusals(400, 404, 503))
    def compare(body: CompareRequest) -> dict:
        """The two answers' tokens aligned by their text, and for each aligned pair and each map of the methods
        the Spearman correlation, the IoU of the top 10% cells and the shift of the highest cell (in A's cells, B
        resampled onto A's grid where they differ); every token's image share of relevancy: compare.json."""
        with admission.slot():
            return compare_requests(service, body.request_a, body.request_b, body.methods, body.options)

    # --- share links: an opaque id that reopens a request from any front end of this backend -----------------
    @api.post("/v1/share", responses=refusals(400, 404, 503))
    def share(body: ShareRequest) -> dict:
        """A link id for the request (opaque: never its image or prompt), kept with the request's inputs and answer
        ids; `expires_at`: Unix seconds, null where links do not expire (the hosted mode's share_link_hours)."""
        with admission.slot():
            link = service.share(body.request_id)
        return {"share_id": link.share_id, "expires_at": link.expires_at}

    @api.get("/v1/share/{share_id}", responses=refusals(400, 404, 503))
    def open_shared(share_id: str) -> dict:
        """The shared request as /v1/generate answers it (its `request_id` here, for the other endpoints), with its
        generation `options`; regenerated if it was evicted. 404: an unknown or expired link, in one line."""
        with admission.slot():
            shared = service.open_shared(share_id)
        return {**trace_summary(shared.request_id, shared.trace), "options": asdict(shared.options)}

    @api.get("/v1/share/{share_id}/image", response_class=Response, responses={
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}, **refusals(400, 404, 503)})
    def shared_image(share_id: str) -> Response:
        """The shared request's image as PNG (the pixels the model saw), for a front end to draw the maps on."""
        buffer = io.BytesIO()
        with admission.slot():  # encoding a large picture is work like any other
            service.shared_request(share_id)[1].images[0].save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    # --- the analyses of Neo et al., next to the model --------------------------------------------------------
    @api.post("/v1/logit-lens", responses=refusals(400, 404, 503))
    def lens(body: LogitLensRequest) -> dict:
        """Top-k tokens of every patch of the first image after every LM layer."""
        with admission.slot():
            return service.logit_lens(body.request_id, body.k).to_json()

    @api.post("/v1/analysis-tokens", responses=refusals(400, 404, 503))
    def analysis_tokens(body: TokenSetRequest) -> dict:
        """Positions of a token set: object (a box x0,y0,x1,y1 with a cell buffer), register, random (k, seed) or
        top (k, method)."""
        selection = body.model_dump(exclude={"request_id", "kind", "token_index"}, exclude_none=True)
        with admission.slot():
            return {"positions": service.analysis_tokens(body.request_id, body.kind, body.token_index, **selection)}

    @api.post("/v1/ablate", responses=refusals(400, 404, 503))
    def ablation(body: AblationRequest) -> dict:
        """Mean (over the example scenes) or zero ablation of image tokens; the answer is regenerated."""
        with admission.slot():
            return service.ablate(body.request_id, body.positions, body.token_index, body.replacement).to_json()

    @api.post("/v1/knockout", responses=refusals(400, 404, 503))
    def attention_knockout(body: KnockoutRequest) -> dict:
        """Attention from the token's predicting position to the positions blocked per layer window."""
        with admission.slot():
            return service.knockout(body.request_id, body.positions, body.token_index, body.windows).to_json()

    # --- sparse autoencoders: the service's named SAEs (the shipped one: demo) ------------------------------------
    @api.post("/v1/sae/features", responses=refusals(400, 404, 503))
    def sae_features(body: SAEFeaturesRequest) -> dict:
        """Each cell's top-k SAE features on the first image's grid."""
        with admission.slot():
            return service.sae_features(body.request_id, body.sae, body.k)

    @api.post("/v1/sae/feature", responses=refusals(400, 404, 503))
    def sae_feature(body: SAEFeatureRequest) -> dict:
        """A feature's map on the image and its top-activating patches over the SAE's cached images."""
        with admission.slot():
            return service.sae_feature(body.request_id, body.sae, body.feature, body.top)

    @api.post("/v1/sae/steer", responses=refusals(400, 404, 503))
    def sae_steer(body: SAESteerRequest) -> dict:
        """The answer generated again with features scaled, zeroed or clamped at the SAE's hook point: a new
        request (`request_id`: every /v1/explain method works on it), and the attention and TAM maps of one answer
        token before and after."""
        with admission.slot():
            return service.sae_steer(body.request_id, body.sae, body.scales, body.values, body.cells,
                                     body.token_index)

    return api


def serving_api(model: str, device: str = "auto", hosted: bool = False, cache_mb: int = 1024, concurrency: int = 1,
                queue: int = 16) -> FastAPI:
    """The backend as `python -m lvlm_interpret serve` runs it, its model loaded (a bad one fails here); `hosted`
    applies configs/hosted.json (allowed models, answer length, upload size and image pixels, memory for images in
    flight, concurrency, queue, time limit, requests per minute per client)."""
    limits = hosted_limits() if hosted else {}
    service = hosted_service(model, limits, device=device) if hosted else ExplainService(
        default_model=model, cache_bytes=cache_mb * 2 ** 20, device=device)
    service.model()
    admission = Admission(limits.get("concurrency", concurrency), limits.get("queue", queue))
    return create_api(service, admission, **(hosted_bounds(limits, admission) if hosted else {}))


def hosted_bounds(limits: dict, admission: Admission, rate_limited: bool = True) -> dict:
    """`create_api`'s bounds under the hosted `limits`: the upload cap, the image budget and, where
    `rate_limited`, the per-client rate limit."""
    bounds = {"max_upload_bytes": int(limits["max_upload_mb"] * 2 ** 20),
              "images": ImageBudget(limits["max_image_pixels"], limits["image_memory_mb"] * 2 ** 20,
                                    admission.wait_s)}
    if rate_limited:
        bounds["rate_limiter"] = RateLimiter(limits["rate_limit_per_minute"])
    return bounds
