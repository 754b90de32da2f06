"""Writing a request's results: the CLI contract (result.json + maps.npz), overlay PNGs and an HTML report.
The CLI and the web app's export buttons both use it."""

from __future__ import annotations

import html
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserInputError
from .methods import Explanation
from .methods.base import check_method_options, quick_methods
from .backend import TraceView
from .rendering import captioned_map, map_caption, map_label, png_data_uri, token_word
from .trace import Trace

CLEANN_KEYS = ("image_cells", "view_cells", "text_tokens", "prob_before", "prob_after", "verified", "message", "layer",
               "head", "edges")


def image_info(trace: Trace) -> dict:
    """The contract's "image": one image's fields, or per-image lists for several images. `grid` and `box` are the
    map's; tiled images (several views) also list every view's name, grid and box, the map's first."""
    infos = [{"width": layout.image_size[0], "height": layout.image_size[1], "grid": [layout.rows, layout.cols],
              "box": [round(v, 3) for v in layout.box]} for layout in trace.images]
    if any(len(layout.views) > 1 for layout in trace.images):
        for info, layout in zip(infos, trace.images):
            info["views"] = [{"name": v.name, "grid": [v.rows, v.cols], "box": [round(b, 3) for b in v.box]}
                             for v in layout.views]
    if len(infos) == 1:
        return infos[0]
    return {key: [info[key] for info in infos] for key in infos[0]}


def answer_record(trace: TraceView) -> dict:
    """The request's inputs and answer: the start of result.json and of the HTTP generate response."""
    return {
        "model": trace.model_name,
        "prompt": trace.prompt,
        "answer": trace.answer,
        "answer_tokens": [{"index": i, "id": trace.answer_ids[i], "text": trace.answer_texts[i]}
                          for i in range(trace.n_answer)],
        "answer_logprobs": [round(float(v), 6) for v in trace.answer_logprobs],
    }


def request_record(trace: Trace, indices: list[int], explanations: dict[str, list[Explanation]], relevance=None,
                   method_options: dict | None = None, timings: dict | None = None, trust: dict | None = None) -> dict:
    """result.json, the one record of a request for the CLI, the exports and HTTP: `indices`, the tokens whose
    maps are written; CLEANN's sets for the tokens it explained (it may explain fewer)."""
    record = answer_record(trace)
    record = {
        **record,
        "tokens": [record["answer_tokens"][i] for i in indices],
        "image": image_info(trace),
        "methods": list(explanations),
        "method_options": {name: (method_options or {}).get(name, {}) for name in explanations},
        "generation": trace.generation,
        "trace_bytes": trace.nbytes,
        "timings_s": {name: round(value, 4) for name, value in (timings or {}).items()},
    }
    if "cleann" in explanations:
        record["cleann"] = {str(e.token_index): {k: e.details[k] for k in CLEANN_KEYS} for e in explanations["cleann"]}
    if relevance is not None:
        record["llr"] = [round(value, 6) for value in relevance.llr]
        record["visually_relevant"] = relevance.relevant
    if trust is not None:
        record["trust"] = {str(index): entry for index, entry in trust.items()}
    return record


def map_arrays(trace: Trace, explanations: dict[str, list[Explanation]]) -> dict[str, np.ndarray]:
    """One float32 [tokens, rows, cols] array per map (per image: MAP_imageK when there are several)."""
    arrays = {}
    for explained in explanations.values():
        for map_name in explained[0].all_maps():
            for k in range(len(trace.images)):
                key = map_name if len(trace.images) == 1 else f"{map_name}_image{k}"
                arrays[key] = np.stack([e.all_maps()[map_name][k] for e in explained]).astype(np.float32)
    return arrays


def captioned_overlays(trace: Trace, explanation: Explanation) -> Iterator[tuple[str, str, Image.Image]]:
    """(name MAP_tokenT[_imageK], caption, figure) for every map of one explanation: the map blended over its
    image at the image's size, with the colour bar of its scale and the caption (the token's word, the map,
    layers / heads when known) below."""
    several = len(trace.images) > 1
    for map_name, maps in explanation.all_maps().items():
        caption = map_caption(trace.answer_texts[explanation.token_index], map_name, explanation.details)
        for k, (grid, layout) in enumerate(zip(maps, trace.images)):
            name = f"{map_name}_token{explanation.token_index}" + (f"_image{k}" if several else "")
            image_caption = caption + (f" \u00b7 image {k + 1}" if several else "")
            yield name, image_caption, captioned_map(trace.image(k), shown_map(explanation, map_name, k), layout,
                                                     image_caption)


def shown_map(explanation: Explanation, map_name: str, image_index: int) -> np.ndarray:
    """The map drawn for a figure: the method's own map at its own resolution where it has one (details
    "fine_map", first image: iGOS++'s mask finer than the token grid), else the grid map."""
    if image_index == 0 and map_name == explanation.method and "fine_map" in explanation.details:
        return explanation.details["fine_map"]
    return explanation.all_maps()[map_name][image_index]


def answer_overlays(trace: Trace, explanations: list[Explanation]) -> dict[str, Image.Image]:
    """Answer-level maps (one map for several tokens, e.g. igos_answer) as captioned figures named by the map."""
    figures = {}
    for explanation in explanations:
        words = " ".join(token_word(trace.answer_texts[t]) for t in explanation.details["tokens"])
        caption = f"{words} \u00b7 {map_label(explanation.method)}"
        figures[explanation.method] = captioned_map(trace.image(0), shown_map(explanation, explanation.method, 0),
                                                    trace.images[0], caption)
    return figures


def overlay_images(trace: Trace, explanation: Explanation) -> dict[str, Image.Image]:
    """Every map of one explanation as a captioned figure with its colour bar (`captioned_overlays`), by name."""
    return {name: picture for name, _, picture in captioned_overlays(trace, explanation)}


@contextmanager
def staged_folder(out) -> Iterator[Path]:
    """A temporary folder inside `out` to write into: its contents move into `out` together when the block ends
    without error, and are removed otherwise, so `out` never holds half-written output."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        yield staging
        for item in staging.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_request(out: Path, trace: Trace, record: dict, explanations: dict[str, list[Explanation]],
                  png: bool = False, save_trace: bool = False, answer_maps: list[Explanation] = ()) -> Path:
    """result.json, maps.npz and optionally the trace and overlay PNGs, moved into `out` together; `answer_maps`
    (one explanation for the whole answer each) are saved as [1, rows, cols] arrays under their method's name."""
    with staged_folder(out) as staging:
        (staging / "result.json").write_text(json.dumps(record, indent=2))
        answer_arrays = {e.method: np.stack([e.maps[0]]).astype(np.float32) for e in answer_maps}
        np.savez_compressed(staging / "maps.npz", **map_arrays(trace, explanations), **answer_arrays)
        if save_trace:
            trace.save(staging / "trace.safetensors")
        if png:
            (staging / "overlays").mkdir()
            for explained in explanations.values():
                for explanation in explained:
                    for name, picture in overlay_images(trace, explanation).items():
                        picture.save(staging / "overlays" / f"{name}.png")
            for name, picture in answer_overlays(trace, list(answer_maps)).items():
                picture.save(staging / "overlays" / f"{name}.png")
    return Path(out)


def html_report(trace: Trace, token_index: int, explanations: list[Explanation]) -> str:
    """A self-contained page (images inline) with the answer and one token's maps from every method."""
    tokens = "".join(
        f'<span class="{"token selected" if i == token_index else "token"}">{html.escape(text)}</span>'
        for i, text in enumerate(trace.answer_texts))
    figures = "".join(
        f'<figure><img src="{png_data_uri(picture)}" alt="{html.escape(caption)}">'
        f"<figcaption><code>{html.escape(name)}</code></figcaption></figure>"
        for explanation in explanations for name, caption, picture in captioned_overlays(trace, explanation))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lvlm_interpret report</title>
<style>body{{font-family:sans-serif;margin:2em}}.token{{margin-right:.35em;padding:0 .2em}}
.selected{{background:#f59e0b}}figure{{display:inline-block;vertical-align:top;margin:.5em;max-width:100%}}
img{{display:block;max-width:100%}}</style></head>
<body><h1>lvlm_interpret report</h1>
<p><b>Model</b> {html.escape(trace.model_name)}<br><b>Prompt</b> {html.escape(trace.prompt)}<br>
<b>Answer</b> {html.escape(trace.answer)}</p>
<p>{tokens}</p><h2>{html.escape(token_word(trace.answer_texts[token_index]))} (answer token {token_index})</h2>
<p>Each map is blended over the image; its colour bar gives the scale, from 0 to the map's own maximum.</p>
{figures}
</body></html>
"""


EXPORT_KINDS = ("png", "request", "report")
WHOLE_ANSWER_METHODS = ("attention", "relevancy", "tam")  # CLEANN is exported for the selected token only


def export_files(service, request_id: str, token_index: int, kind: str, folder: Path,
                 options: dict[str, dict] | None = None) -> list[Path]:
    """Write one export of a request into `folder`: "png" (the token's maps from every method), "request"
    (result.json + maps.npz, the CLI's contract) or "report" (a self-contained HTML page); `options` per method,
    as the page shows them."""
    if kind not in EXPORT_KINDS:
        raise UserInputError(f"unknown export {kind!r}: choose one of {', '.join(EXPORT_KINDS)}")
    options = check_method_options(options or {})
    trace = service.trace(request_id)
    trace.check_token_index(token_index)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def explain(method, t):
        return service.explain(request_id, method, t, **options.get(method, {}))

    if kind == "png":
        paths = []
        for method in quick_methods():
            for name, picture in overlay_images(trace, explain(method, token_index)).items():
                picture.save(folder / f"{name}.png")
                paths.append(folder / f"{name}.png")
        return paths
    if kind == "request":
        tokens = list(range(trace.n_answer))
        maps = {name: [explain(name, t) for t in tokens] for name in WHOLE_ANSWER_METHODS}
        record = request_record(trace, tokens, {**maps, "cleann": [explain("cleann", token_index)]},
                                service.visual_relevance(request_id), options)
        write_request(folder, trace, record, maps)
        return [folder / "result.json", folder / "maps.npz"]
    path = folder / f"report-token{token_index}.html"
    path.write_text(html_report(trace, token_index, [explain(m, token_index) for m in quick_methods()]))
    return [path]
