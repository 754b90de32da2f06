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
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .analysis.knockout import WINDOWS
from .capture import GenerationOptions
from .errors import ServiceBusyError, UnknownRequestError, UserInputError
from .images import decode_image
from .methods import METHODS
from .service import ExplainService, hosted_limits, hosted_service

MAX_UPLOAD_BYTES = 20 * 2 ** 20
RETRY_AFTER_S = 5
FORM_OVERHEAD_BYTES = 64 * 2 ** 10  # the prompt and options around the image
log = logging.getLogger(__name__)


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


class ReverseRequest(BaseModel):
    request_id: str
    cells: list[tuple[int, int]]
    layers: str = "all"
    heads: str = "all"
    aggregation: str = "mean"


class ExplainRequest(BaseModel):
    request_id: str
    method: str = "attention"
    token_index: int = Field(ge=0)
    options: dict = Field(default_factory=dict)


class LogitLensRequest(BaseModel):
    request_id: str
    k: int = 5


class TokenSetRequest(BaseModel):
    """A token set of the first image (lvlm_interpret.analysis.token_sets.select_tokens, but a box, not a mask)."""
    model_config = ConfigDict(extra="forbid")
    request_id: str
    kind: str
    token_index: int = Field(0, ge=0)
    box: list[float | str] | None = None
    buffer: int = 0
    k: int | None = None
    seed: int = 0
    method: str | None = None


class AblationRequest(BaseModel):
    request_id: str
    positions: list[int]
    token_index: int = Field(0, ge=0)
    replacement: str = "mean"


class KnockoutRequest(BaseModel):
    request_id: str
    positions: list[int]
    token_index: int = Field(0, ge=0)
    windows: list[str] = Field(default_factory=lambda: list(WINDOWS))


def trace_summary(request_id: str, trace) -> dict:
    """What a front end needs about a generation (no tensors)."""
    return {
        "request_id": request_id,
        "model": trace.model_name,
        "prompt": trace.prompt,
        "answer": trace.answer,
        "answer_texts": trace.answer_texts,
        "token_texts": trace.token_texts,
        "prompt_length": trace.prompt_length,
        "answer_ids": trace.answer_ids,
        "answer_logprobs": trace.answer_logprobs.tolist(),
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


def read_upload(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES) -> Image.Image:
    if not data:
        raise UserInputError("the uploaded image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise UserInputError(f"the uploaded image is larger than {max_bytes / 2 ** 20:g} MB: upload a smaller file")
    return decode_image(io.BytesIO(data), "the uploaded file")


def create_api(service: ExplainService, admission: Admission | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """Errors are JSON `{"error": one line}`: 400 bad input, 404 unknown request id or endpoint, 413 upload too
    large, 503 busy (with Retry-After), 500 anything else (logged here; the client sees no trace or path)."""
    admission = admission or Admission()
    api = FastAPI(title="lvlm_interpret", version="1",
                  description="Generate with capture, then explain any answer token with any registered method.")

    @api.exception_handler(UserInputError)
    async def user_error(request, error: UserInputError):
        if isinstance(error, ServiceBusyError):
            return JSONResponse(status_code=503, content={"error": str(error)},
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse(status_code=404 if isinstance(error, UnknownRequestError) else 400,
                            content={"error": str(error)})

    @api.exception_handler(RequestValidationError)
    async def invalid_fields(request, error: RequestValidationError):
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if part not in ("body", "query", "path"))
        return JSONResponse(status_code=400, content={"error": f"{field or 'request'}: {first['msg']}"})

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        message = "no such endpoint: see /docs for the API" if error.status_code == 404 else str(error.detail)
        return JSONResponse(status_code=error.status_code, content={"error": message}, headers=error.headers)

    @api.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        log.exception("request %s failed", request.url.path)
        return JSONResponse(status_code=500, content={"error": "internal error (logged on the server); try again"})

    @api.middleware("http")
    async def refuse_large_bodies(request, call_next):
        """Refuse an oversized upload from its declared length, before it is received."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_upload_bytes + FORM_OVERHEAD_BYTES:
            return JSONResponse(status_code=413, content={
                "error": f"the upload is larger than {max_upload_bytes / 2 ** 20:g} MB: upload a smaller file"})
        return await call_next(request)

    @api.get("/v1/health")
    def health() -> dict:
        """Liveness, plus the figures an operator watches: bytes held for requests and requests in progress."""
        return {"status": "ok", "default_model": service.default_model, "memory": service.memory(),
                "in_progress": admission.admitted}

    @api.get("/v1/methods")
    def methods() -> dict:
        return {name: method.description for name, method in sorted(METHODS.items())}

    @api.post("/v1/generate")
    def generate(image: UploadFile = File(...), prompt: str = Form(...), max_new_tokens: int = Form(32),
                 temperature: float = Form(0.0), top_p: float = Form(1.0), seed: int = Form(0)) -> dict:
        """Greedy when temperature is 0, else sampled with `top_p` and `seed`."""
        picture = read_upload(image.file.read(max_upload_bytes + 1), max_upload_bytes)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, seed=seed) if temperature > 0 else {}
        with admission.slot():
            request_id, trace = service.generate([picture], prompt,
                                                 options=GenerationOptions(max_new_tokens, **sampling))
        return trace_summary(request_id, trace)

    @api.get("/v1/visual-relevance/{request_id}")
    def visual_relevance(request_id: str, threshold: float = 1.0) -> dict:
        with admission.slot():
            relevance = service.visual_relevance(request_id, threshold)
        return {"llr": relevance.llr, "relevant": relevance.relevant}

    @api.get("/v1/attention-overview/{request_id}/{token_index}")
    def overview(request_id: str, token_index: int) -> dict:
        with admission.slot():
            masses = service.attention_overview(request_id, token_index)
        return {name: values.tolist() for name, values in masses.items()}

    @api.post("/v1/reverse-attention")
    def reverse(body: ReverseRequest) -> dict:
        with admission.slot():
            scores = service.reverse_attention(body.request_id, body.cells, body.layers, body.heads, body.aggregation)
        return {"scores": scores.tolist()}

    @api.get("/v1/export/{request_id}/{token_index}/{kind}", response_class=Response,
             responses={200: {"content": {"application/zip": {}}}})
    def export(request_id: str, token_index: int, kind: str, options: str = "{}") -> Response:
        """A zip of one export: png (the token's maps), request (result.json + maps.npz) or report (HTML);
        `options`: the methods' options as JSON, {"cleann": {"head": 0}}."""
        try:
            parsed = json.loads(options)
        except ValueError:
            raise UserInputError("options must be JSON, e.g. {\"cleann\": {\"head\": 0}}") from None
        with tempfile.TemporaryDirectory(prefix="lvlm-export-") as folder, admission.slot():
            paths = service.export(request_id, token_index, kind, folder, parsed)
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in paths:
                    archive.write(path, arcname=Path(path).name)
        return Response(buffer.getvalue(), media_type="application/zip")

    @api.post("/v1/explain")
    def explain(body: ExplainRequest) -> dict:
        with admission.slot():
            explanation = service.explain(body.request_id, body.method, body.token_index, **body.options)
        return explanation_json(explanation)

    # --- the analyses of Neo et al., next to the model --------------------------------------------------------
    @api.post("/v1/logit-lens")
    def lens(body: LogitLensRequest) -> dict:
        """Top-k tokens of every patch of the first image after every LM layer."""
        with admission.slot():
            return service.logit_lens(body.request_id, body.k).to_json()

    @api.post("/v1/analysis-tokens")
    def analysis_tokens(body: TokenSetRequest) -> dict:
        """Positions of a token set: object (a box x0,y0,x1,y1 with a cell buffer), register, random (k, seed) or
        top (k, method)."""
        selection = body.model_dump(exclude={"request_id", "kind", "token_index"}, exclude_none=True)
        with admission.slot():
            return {"positions": service.analysis_tokens(body.request_id, body.kind, body.token_index, **selection)}

    @api.post("/v1/ablate")
    def ablation(body: AblationRequest) -> dict:
        """Mean (over the example scenes) or zero ablation of image tokens; the answer is regenerated."""
        with admission.slot():
            return service.ablate(body.request_id, body.positions, body.token_index, body.replacement).to_json()

    @api.post("/v1/knockout")
    def attention_knockout(body: KnockoutRequest) -> dict:
        """Attention from the token's predicting position to the positions blocked per layer window."""
        with admission.slot():
            return service.knockout(body.request_id, body.positions, body.token_index, body.windows).to_json()

    return api


def serving_api(model: str, device: str = "auto", hosted: bool = False, cache_mb: int = 1024, concurrency: int = 1,
                queue: int = 16) -> FastAPI:
    """The backend as `python -m lvlm_interpret serve` runs it, its model loaded (a bad one fails here); `hosted`
    applies configs/hosted.json (allowed models, answer length, upload size, concurrency, queue, time limit)."""
    limits = hosted_limits() if hosted else {}
    service = hosted_service(model, limits, device=device) if hosted else ExplainService(
        default_model=model, cache_bytes=cache_mb * 2 ** 20, device=device)
    service.model()
    return create_api(service, Admission(limits.get("concurrency", concurrency), limits.get("queue", queue)),
                      max_upload_bytes=int(limits["max_upload_mb"] * 2 ** 20) if hosted else MAX_UPLOAD_BYTES)
