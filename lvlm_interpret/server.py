"""The service over HTTP (FastAPI; OpenAPI schema at /docs and /openapi.json).

`python -m lvlm_interpret serve --host 127.0.0.1 --port 8000` starts it alone; `python app.py --backend URL`
points a web front end at it, so a CPU-only front end can use a GPU machine.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from .capture import GenerationOptions
from .errors import UserInputError
from .images import MAX_PIXELS, prepare_image
from .methods import METHODS
from .service import ExplainService

MAX_UPLOAD_BYTES = 20 * 2 ** 20


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


def read_upload(data: bytes) -> Image.Image:
    if not data:
        raise UserInputError("the uploaded image is empty (0 bytes)")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UserInputError(f"the uploaded image is larger than {MAX_UPLOAD_BYTES // 2 ** 20} MB")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > MAX_PIXELS:
                raise UserInputError(f"the image is too large ({opened.width}x{opened.height})")
            opened.load()
            return prepare_image(opened)
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise UserInputError("the upload is not a readable image (PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError):
        raise UserInputError("the uploaded image is corrupt or truncated") from None


def create_api(service: ExplainService) -> FastAPI:
    api = FastAPI(title="lvlm_interpret", version="1",
                  description="Generate with capture, then explain any answer token with any registered method.")

    @api.exception_handler(UserInputError)
    async def user_error(request, error: UserInputError):
        return JSONResponse(status_code=400, content={"error": str(error)})

    @api.get("/v1/health")
    def health() -> dict:
        return {"status": "ok", "default_model": service.default_model}

    @api.get("/v1/methods")
    def methods() -> dict:
        return {name: method.description for name, method in sorted(METHODS.items())}

    @api.post("/v1/generate")
    def generate(image: UploadFile = File(...), prompt: str = Form(...), max_new_tokens: int = Form(32)) -> dict:
        picture = read_upload(image.file.read())
        request_id, trace = service.generate([picture], prompt, options=GenerationOptions(max_new_tokens))
        return trace_summary(request_id, trace)

    @api.get("/v1/visual-relevance/{request_id}")
    def visual_relevance(request_id: str, threshold: float = 1.0) -> dict:
        relevance = service.visual_relevance(request_id, threshold)
        return {"llr": relevance.llr, "relevant": relevance.relevant}

    @api.get("/v1/attention-overview/{request_id}/{token_index}")
    def overview(request_id: str, token_index: int) -> dict:
        return {name: values.tolist() for name, values in service.attention_overview(request_id, token_index).items()}

    @api.post("/v1/reverse-attention")
    def reverse(body: ReverseRequest) -> dict:
        scores = service.reverse_attention(body.request_id, body.cells, body.layers, body.heads, body.aggregation)
        return {"scores": scores.tolist()}

    @api.get("/v1/export/{request_id}/{token_index}/{kind}", response_class=Response,
             responses={200: {"content": {"application/zip": {}}}})
    def export(request_id: str, token_index: int, kind: str) -> Response:
        """A zip of one export: png (the token's maps), request (result.json + maps.npz) or report (HTML)."""
        with tempfile.TemporaryDirectory(prefix="lvlm-export-") as folder:
            paths = service.export(request_id, token_index, kind, folder)
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in paths:
                    archive.write(path, arcname=Path(path).name)
        return Response(buffer.getvalue(), media_type="application/zip")

    @api.post("/v1/explain")
    def explain(body: ExplainRequest) -> dict:
        return explanation_json(service.explain(body.request_id, body.method, body.token_index, **body.options))

    return api
