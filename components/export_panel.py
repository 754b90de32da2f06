"""Export: the selected token's maps as PNG files, the whole request as JSON + NPZ (the CLI's contract), and a
self-contained HTML report."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from lvlm_interpret import METHODS, ExplainService, UserInputError
from lvlm_interpret.export import html_report, overlay_images, request_record, write_request

EXPORT_ROOT = Path(tempfile.gettempdir()) / "lvlm_interpret_exports"
WHOLE_ANSWER_METHODS = ("attention", "relevancy", "tam")  # CLEANN is exported for the selected token only


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


def _full_trace(service, request_id):
    if not isinstance(service, ExplainService):
        raise UserInputError("export runs where the model runs: use the backend's HTTP API, or the in-process app")
    return service.trace(request_id)


def _folder(request_id: str, kind: str) -> Path:
    folder = EXPORT_ROOT / request_id / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def export_token_pngs(service: ExplainService, request_id: str, token_index: int) -> list[str]:
    trace = _full_trace(service, request_id)
    folder = _folder(request_id, "png")
    paths = []
    for method in sorted(METHODS):
        for name, picture in overlay_images(trace, service.explain(request_id, method, token_index)).items():
            path = folder / f"{name}.png"
            picture.save(path)
            paths.append(str(path))
    return paths


def export_request(service: ExplainService, request_id: str, token_index: int) -> list[str]:
    trace = _full_trace(service, request_id)
    tokens = list(range(trace.n_answer))
    explanations = {name: [service.explain(request_id, name, t) for t in tokens] for name in WHOLE_ANSWER_METHODS}
    record = request_record(trace, tokens, explanations, service.visual_relevance(request_id))
    record["cleann"] = request_record(trace, [token_index],
                                      {"cleann": [service.explain(request_id, "cleann", token_index)]})["cleann"]
    folder = write_request(_folder(request_id, "request"), trace, record, explanations)
    return [str(folder / "result.json"), str(folder / "maps.npz")]


def export_report(service: ExplainService, request_id: str, token_index: int) -> list[str]:
    trace = _full_trace(service, request_id)
    explanations = [service.explain(request_id, method, token_index) for method in sorted(METHODS)]
    path = _folder(request_id, "report") / f"report-token{token_index}.html"
    path.write_text(html_report(trace, token_index, explanations))
    return [str(path)]
