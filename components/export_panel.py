"""Export: the selected token's maps as PNG files, the whole request as JSON + NPZ (the CLI's contract), and a
self-contained HTML report. Files are made by the service (in process or over HTTP)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

EXPORT_ROOT = Path(tempfile.gettempdir()) / "lvlm_interpret_exports"


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


def export(service, request_id: str, token_index: int, kind: str, options: dict | None = None) -> list[str]:
    """The files of one export ("png", "request" or "report"), in this session's own export folder, with the
    methods' options as the page set them."""
    folder = EXPORT_ROOT / request_id / kind
    return [str(path) for path in service.export(request_id, token_index, kind, folder, options)]
