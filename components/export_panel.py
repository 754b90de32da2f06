"""Export: the selected token's maps as PNG files, the whole request as JSON + NPZ (the CLI's contract), and a
self-contained HTML report. Files are made by the service (in process or over HTTP)."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from lvlm_interpret import ExplainBackend

EXPORT_ROOT = Path(tempfile.gettempdir()) / "lvlm_interpret_exports"
# a hosted page exports for strangers all day: a request's files go once the page has had time to serve them
EXPORT_MAX_AGE_S = 3600


@dataclass
class ExportPanel:
    pngs: gr.Button
    request: gr.Button
    report: gr.Button
    files: gr.File

    @classmethod
    def build(cls) -> "ExportPanel":
        with gr.Accordion("Export", open=False):
            with gr.Row():
                pngs = gr.Button("Token maps (PNG)", elem_id="export-png")
                request = gr.Button("Request (JSON + NPZ)", elem_id="export-request")
                report = gr.Button("HTML report", elem_id="export-report")
            files = gr.File(label="Files", file_count="multiple", interactive=False, elem_id="export-files")
        return cls(pngs, request, report, files)


def prune_exports(max_age_s: float = EXPORT_MAX_AGE_S) -> None:
    """Remove the export folders of requests last written more than `max_age_s` ago."""
    if not EXPORT_ROOT.is_dir():
        return
    oldest = time.time() - max_age_s
    for folder in EXPORT_ROOT.iterdir():
        if folder.stat().st_mtime < oldest:
            shutil.rmtree(folder, ignore_errors=True)


def export(service: ExplainBackend, request_id: str, token_index: int, kind: str,
           options: dict | None = None) -> list[str]:
    """The files of one export ("png", "request" or "report"), in this session's own export folder, with the
    methods' options as the page set them."""
    prune_exports()
    folder = EXPORT_ROOT / request_id / kind
    return [str(path) for path in service.export(request_id, token_index, kind, folder, options)]
