"""A front end's view of a remote service (`python -m lvlm_interpret serve`): the same calls as ExplainService."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from .capture import GenerationOptions
from .errors import UserInputError
from .families.base import ImageLayout
from .methods.base import Explanation
from .methods.visual_relevance import VisualRelevance


@dataclass
class RemoteTrace:
    """The parts of a Trace a front end shows."""

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


class RemoteService:
    def __init__(self, url: str | None = None, client: httpx.Client | None = None, timeout_s: float = 300.0):
        self._client = client or httpx.Client(base_url=url, timeout=timeout_s)
        self._traces: dict[str, RemoteTrace] = {}
        self.default_model = self._call("GET", "/v1/health")["default_model"]

    def _call(self, verb: str, path: str, **kwargs) -> dict:
        try:
            response = self._client.request(verb, path, **kwargs)
        except httpx.HTTPError as error:
            raise UserInputError(f"the backend at {self._client.base_url} cannot be reached ({type(error).__name__});"
                                 " check that it is running and try again") from None
        if response.status_code == 400:
            raise UserInputError(response.json().get("error", "the backend refused the request"))
        if response.status_code != 200:
            raise UserInputError(f"the backend failed ({response.status_code}); try again")
        return response.json()

    def model(self, name: str | None = None):
        return None  # models live on the backend

    def generate(self, images, prompt: str, model: str | None = None, options: GenerationOptions | None = None):
        if len(images) != 1:
            raise UserInputError("the HTTP backend takes one image per request")
        options = options or GenerationOptions()
        buffer = io.BytesIO()
        images[0].save(buffer, format="PNG")
        summary = self._call("POST", "/v1/generate", files={"image": ("image.png", buffer.getvalue(), "image/png")},
                             data={"prompt": prompt, "max_new_tokens": str(options.max_new_tokens)})
        trace = RemoteTrace(
            request_id=summary["request_id"], model_name=summary["model"], prompt=summary["prompt"],
            answer=summary["answer"], answer_texts=summary["answer_texts"], answer_ids=summary["answer_ids"],
            images=[ImageLayout.from_json(layout) for layout in summary["images"]], n_layers=summary["n_layers"],
            n_heads=summary["n_heads"], answer_logprobs=summary["answer_logprobs"],
            token_texts=summary["token_texts"], prompt_length=summary["prompt_length"],
        )
        self._traces[trace.request_id] = trace
        return trace.request_id, trace

    def trace(self, request_id: str) -> RemoteTrace:
        if request_id not in self._traces:
            raise UserInputError("unknown or expired request: generate an answer first")
        return self._traces[request_id]

    def attention_overview(self, request_id: str, token_index: int) -> dict[str, np.ndarray]:
        body = self._call("GET", f"/v1/attention-overview/{request_id}/{token_index}")
        return {name: np.asarray(values, dtype=np.float32) for name, values in body.items()}

    def reverse_attention(self, request_id: str, cells, layers="all", heads="all", aggregation="mean") -> np.ndarray:
        body = self._call("POST", "/v1/reverse-attention", json={
            "request_id": request_id, "cells": [list(cell) for cell in cells], "layers": str(layers),
            "heads": str(heads), "aggregation": aggregation})
        return np.asarray(body["scores"], dtype=np.float32)

    def visual_relevance(self, request_id: str, threshold: float = 1.0) -> VisualRelevance:
        body = self._call("GET", f"/v1/visual-relevance/{request_id}", params={"threshold": threshold})
        return VisualRelevance(llr=body["llr"], logprob_image=[], logprob_blurred=[], relevant=body["relevant"])

    def export(self, request_id: str, token_index: int, kind: str, folder) -> list[Path]:
        """Fetch an export from the backend and unpack it into `folder` (file names only, no paths)."""
        try:
            response = self._client.get(f"/v1/export/{request_id}/{token_index}/{kind}")
        except httpx.HTTPError:
            raise UserInputError(f"the backend at {self._client.base_url} cannot be reached; try again") from None
        if response.status_code != 200:
            raise UserInputError(response.json().get("error", "the backend refused the export"))
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
            for name in archive.namelist():
                path = folder / Path(name).name
                path.write_bytes(archive.read(name))
                paths.append(path)
        return paths

    def explain(self, request_id: str, method: str, token_index: int, **options) -> Explanation:
        body = self._call("POST", "/v1/explain", json={"request_id": request_id, "method": method,
                                                        "token_index": token_index, "options": options})
        maps = {name: [np.asarray(grid, dtype=np.float32) for grid in grids] for name, grids in body["maps"].items()}
        prefix = method + "_"
        return Explanation(
            method=method, token_index=token_index, maps=maps.pop(method),
            text_scores=None if body["text_scores"] is None else np.asarray(body["text_scores"], dtype=np.float32),
            variants={name[len(prefix):]: grids for name, grids in maps.items()},
            details=body["details"],
        )
