"""The one interface a front end talks to: `ExplainBackend`, implemented by the in-process `ExplainService` and
by the HTTP client `RemoteService`, and `TraceView`, what a front end reads of a request's trace (a `Trace` in
process, a `RemoteTrace` over HTTP). The page's components are written against these two and nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from .analysis.ablation import AblationResult
from .analysis.knockout import KnockoutResult
from .analysis.logit_lens import LogitLens
from .capture import GenerationOptions
from .families.base import ImageLayout
from .methods.base import Explanation
from .methods.visual_relevance import VisualRelevance


@runtime_checkable
class TraceView(Protocol):
    """A generated answer as a front end sees it: texts, token positions and image layouts, no tensors."""

    model_name: str
    prompt: str
    answer: str
    prompt_length: int
    images: list[ImageLayout]

    @property
    def n_answer(self) -> int: ...

    @property
    def answer_ids(self) -> list[int]: ...

    @property
    def answer_texts(self) -> list[str]: ...

    @property
    def token_texts(self) -> list[str]: ...

    @property
    def n_layers(self) -> int: ...

    @property
    def n_heads(self) -> int: ...

    def source_position(self, token_index: int) -> int: ...

    def check_token_index(self, token_index: int) -> None: ...


@dataclass(frozen=True)
class ShareLink:
    """What reopens a request: an opaque id (never the image or prompt), and when it expires (Unix seconds; None:
    never, it is only forgotten when the bounded store of links is full)."""
    share_id: str
    expires_at: float | None = None


@dataclass(frozen=True)
class SharedRequest:
    """A share link opened: the request's id in this backend (for `explain` ...), its answer, its images and its
    generation options."""
    request_id: str
    trace: TraceView
    images: list[Image.Image]
    options: GenerationOptions


@runtime_checkable
class ExplainBackend(Protocol):
    """Generate answers and explain their tokens. Requests are named by the id `generate` returns; every call
    raises UserInputError (ServiceBusyError when busy, UnknownRequestError for a forgotten id) with one line
    for the user."""

    default_model: str
    allowed_models: list[str] | None  # the models a request may name; None: any the backend can load
    max_new_tokens: int | None  # the longest answer allowed; None: no limit beyond the options' own

    def generate(self, images: list[Image.Image], prompt: str, model: str | None = None,
                 options: GenerationOptions | None = None) -> tuple[str, TraceView]: ...

    def trace(self, request_id: str) -> TraceView: ...

    def share(self, request_id: str) -> ShareLink:
        """An opaque id that reopens the request from any session (`open_shared`), until it expires."""

    def open_shared(self, share_id: str) -> SharedRequest:
        """The request a share link names; UnknownRequestError with one line if it is unknown or expired."""

    def explain(self, request_id: str, method: str, token_index: int, **options) -> Explanation: ...

    def explain_answer(self, request_id: str, method: str = "igos", **options) -> Explanation:
        """A method's one map for the whole answer (igos: its visually relevant tokens together)."""

    def attention_overview(self, request_id: str, token_index: int) -> dict[str, np.ndarray]: ...

    def reverse_attention(self, request_id: str, cells: list[tuple[int, int]], layers="all", heads="all",
                          aggregation: str = "mean") -> np.ndarray: ...

    def visual_relevance(self, request_id: str, threshold: float = 1.0) -> VisualRelevance: ...

    def trust(self, request_id: str, token_index: int, options: dict | None = None) -> dict: ...

    def export(self, request_id: str, token_index: int, kind: str, folder, options: dict | None = None
               ) -> list[Path]: ...

    def logit_lens(self, request_id: str, k: int = 5) -> LogitLens: ...

    def analysis_tokens(self, request_id: str, kind: str, token_index: int = 0, **selection) -> list[int]: ...

    def ablate(self, request_id: str, positions: list[int], token_index: int = 0,
               replacement: str = "mean") -> AblationResult: ...

    def knockout(self, request_id: str, positions: list[int], token_index: int = 0, windows=...
                 ) -> KnockoutResult: ...

    def sae_features(self, request_id: str, sae: str = "demo", k: int = 10) -> dict: ...

    def sae_feature(self, request_id: str, sae: str, feature: int, top: int = 8) -> dict: ...

    def sae_steer(self, request_id: str, sae: str, scales: dict | None = None, values: dict | None = None,
                  cells=None, token_index: int = 0) -> dict: ...
