"""Rich displays for Jupyter: short reprs, self-contained HTML (images inline as data URIs, no scripts, every text
escaped) and PNG figures of the library's results. The classes' `__repr__` / `_repr_html_` call these.

    import lvlm_interpret as li
    trace                                   # the image, prompt, answer tokens, grid, layers x heads
    li.show(trace, token_index=1)           # the token's attention on the image, with a colour bar and caption
    explanation.show(trace, "tam_raw")      # one map of an explanation on the image
"""

from __future__ import annotations

import html
from collections import Counter

import numpy as np
from PIL import Image

from .errors import UserInputError
from .rendering import (
    captioned_map, display_width, grid_picture, map_caption, png_bytes, png_data_uri, scale_bar, token_word,
)

MAX_WIDTH = 768  # the map figure's image width: as the page's (display_width), yet not wider than a notebook cell
THUMBNAIL_WIDTH = 320  # a Trace's images
HEATMAP_PX = 144  # an Explanation's small maps, along their longer side
_BOX = "font-family:sans-serif;font-size:13px;line-height:1.5"
_TABLE = "border-collapse:collapse;font-size:12px"
_CELL = "border:1px solid #ddd;padding:2px 6px;text-align:left"


# --- text -------------------------------------------------------------------------------------------------------
def clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value) -> str:
    """A detail's value in a few characters: long lists and arrays by their size."""
    if isinstance(value, np.ndarray):
        return f"array {'x'.join(map(str, value.shape))}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return str(list(value)) if len(value) <= 6 and len(str(value)) <= 40 else f"{len(value)} items"
    if isinstance(value, dict):
        return f"{len(value)} entries"
    return clip(str(value), 40)


def size_text(n_bytes: int) -> str:
    for unit, scale in (("GB", 2 ** 30), ("MB", 2 ** 20), ("kB", 2 ** 10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def images_text(layouts) -> str:
    """'1 image 8x8 cells' / '2 images 24x24, 12x12 cells'."""
    if not layouts:
        return "no image"
    grids = ", ".join(f"{layout.rows}x{layout.cols}" for layout in layouts)
    return f"{len(layouts)} image{'s' if len(layouts) > 1 else ''} {grids} cells"


# --- HTML -------------------------------------------------------------------------------------------------------
def img_tag(image: Image.Image, alt: str, title: str = "") -> str:
    uri = png_data_uri(image)
    title_attribute = f' title="{html.escape(title)}"' if title else ""
    return (f'<img src="{uri}" alt="{html.escape(alt)}"{title_attribute} width="{image.width}" '
            f'height="{image.height}" style="image-rendering:pixelated;max-width:none">')


def table(headers: list[str], rows: list[list[str]], escape: bool = True) -> str:
    """An HTML table; cells are escaped unless `escape` is False (cells that are markup already)."""
    def cell(tag: str, value: str) -> str:
        return f'<{tag} style="{_CELL}">{html.escape(str(value)) if escape or tag == "th" else value}</{tag}>'
    head = "".join(cell("th", header) for header in headers)
    body = "".join("<tr>" + "".join(cell("td", value) for value in row) + "</tr>" for row in rows)
    return f'<table style="{_TABLE}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def box(title: str, *parts: str) -> str:
    """A titled block: `title` is text (escaped), `parts` are markup."""
    return f'<div style="{_BOX}"><div style="font-weight:bold">{html.escape(title)}</div>{"".join(parts)}</div>'


def thumbnail(image: Image.Image, width: int) -> Image.Image:
    """`image` at `width` pixels wide, same aspect."""
    height = max(1, round(image.height * width / image.width))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def heatmap_picture(values: np.ndarray, size_px: int = HEATMAP_PX) -> Image.Image:
    """A small picture of a [rows, cols] grid about `size_px` along its longer side, coloured from 0 to its
    maximum."""
    return grid_picture(values, int(np.clip(round(size_px / max(values.shape)), 2, 24)))


def heatmap_figure(values: np.ndarray, caption: str) -> str:
    """A small heatmap with its colour bar (0 to the grid's maximum) and a caption under it."""
    top, picture = float(values.max(initial=0)), heatmap_picture(values)
    bar = scale_bar(0.0, top, max(HEATMAP_PX, picture.width))
    return (f'<figure style="margin:0 10px 6px 0">{img_tag(picture, caption, f"max {top:.4g}")}<br>'
            f'{img_tag(bar, f"colour scale 0 to {top:.3g}")}'
            f'<figcaption style="font-size:11px">{html.escape(caption)}</figcaption></figure>')


def row_of(figures: list[str]) -> str:
    return f'<div style="display:flex;flex-wrap:wrap;align-items:flex-end">{"".join(figures)}</div>'


# --- Trace / RemoteTrace ----------------------------------------------------------------------------------------
def trace_repr(trace) -> str:
    size = f", {size_text(trace.nbytes)}" if hasattr(trace, "nbytes") else ""
    request = f"request_id={trace.request_id!r}, " if hasattr(trace, "request_id") else ""
    return (f"{type(trace).__name__}({request}model={trace.model_name!r}, answer={clip(trace.answer)!r}, "
            f"{trace.n_answer} answer tokens, {images_text(trace.images)}, {trace.n_layers} layers x "
            f"{trace.n_heads} heads{size})")


def answer_tokens_html(trace) -> str:
    """The answer as one chip per token; hovering a chip names its index and probability."""
    logprobs = [float(value) for value in trace.answer_logprobs]
    chips = []
    for index, text in enumerate(trace.answer_texts):
        probability = f", p={np.exp(logprobs[index]):.3g}" if index < len(logprobs) else ""
        chips.append(f'<span title="token {index}{probability}" style="display:inline-block;white-space:pre;'
                     f'background:#eef;border:1px solid #ccd;border-radius:3px;padding:0 3px;margin:1px">'
                     f'{html.escape(text if text.strip() else token_word(text))}</span>')
    return "".join(chips)


def trace_html(trace) -> str:
    pixels = getattr(trace, "pixels", [])  # a RemoteTrace carries no image
    pictures = [img_tag(thumbnail(Image.fromarray(p.numpy(), mode="RGB"), THUMBNAIL_WIDTH), f"image {k}")
                for k, p in enumerate(pixels)]
    facts = [("model", trace.model_name), ("answer tokens", str(trace.n_answer)),
             ("images", "; ".join(f"{layout.image_size[0]}x{layout.image_size[1]} px, grid "
                                  f"{layout.rows}x{layout.cols}" for layout in trace.images) or "none"),
             ("layers x heads", f"{trace.n_layers} x {trace.n_heads}")]
    if hasattr(trace, "nbytes"):
        facts.append(("size", size_text(trace.nbytes)))
    if hasattr(trace, "request_id"):
        facts.insert(0, ("request", trace.request_id))
    listing = "".join(f"<div><b>{html.escape(name)}</b>: {html.escape(value)}</div>" for name, value in facts)
    text = (f'<div><b>prompt</b>: <span style="white-space:pre-wrap">{html.escape(trace.prompt)}</span></div>'
            f"<div><b>answer</b>: {answer_tokens_html(trace)}</div>{listing}")
    return box(type(trace).__name__, f'<div style="display:flex;gap:12px;align-items:flex-start">'
                                     f'{"".join(pictures)}<div>{text}</div></div>')


# --- Explanation ------------------------------------------------------------------------------------------------
def explanation_repr(explanation) -> str:
    maps = ", ".join(f"{name} [{', '.join('x'.join(map(str, m.shape)) for m in grids)}]"
                     for name, grids in explanation.all_maps().items())
    details = ", ".join(f"{key}={short(value)}" for key, value in explanation.details.items())
    return clip(f"Explanation(method={explanation.method!r}, token {explanation.token_index}, maps: {maps}"
                f"{'; ' + details if details else ''})", 280)


def explanation_html(explanation) -> str:
    figures = [heatmap_figure(grid, f"{name}{f' (image {k})' if len(grids) > 1 else ''}, "
                                    f"{grid.shape[0]}x{grid.shape[1]} cells")
               for name, grids in explanation.all_maps().items() for k, grid in enumerate(grids)]
    details = "; ".join(f"{key} {short(value)}" for key, value in explanation.details.items())
    return box(f"Explanation: {explanation.method}, answer token {explanation.token_index}",
               f"<div>{html.escape(details)}</div>" if details else "", row_of(figures))


class MapView:
    """One map of an explanation blended on the trace's image, with a colour bar and a caption: a notebook shows
    it as HTML or PNG; `picture()` is the PIL image and `save(path)` writes the PNG."""

    def __init__(self, trace, explanation, map_name: str | None = None, image_index: int = 0, alpha: float = 0.6,
                 smooth: bool = False):
        if not getattr(trace, "pixels", None):
            raise UserInputError("drawing a map needs the trace's images: pass the Trace from generate_with_capture "
                                 "(a RemoteTrace carries no pixels)")
        trace.check_token_index(explanation.token_index)
        maps = explanation.all_maps()
        map_name = map_name or explanation.method
        if map_name not in maps:
            raise UserInputError(f"the explanation has no map {map_name!r}; its maps are {', '.join(maps)}")
        if not 0 <= image_index < len(maps[map_name]):
            raise UserInputError(f"image index {image_index} is out of range: the map covers "
                                 f"{len(maps[map_name])} image(s)")
        layout, grid = trace.images[image_index], maps[map_name][image_index]
        if grid.shape != (layout.rows, layout.cols):
            raise UserInputError(f"the map's grid {grid.shape[0]}x{grid.shape[1]} is not the trace's "
                                 f"{layout.rows}x{layout.cols}: pass the trace the explanation was computed on")
        self.trace, self.explanation, self.map_name, self.image_index = trace, explanation, map_name, image_index
        self.alpha, self.smooth = alpha, smooth

    @property
    def grid(self) -> np.ndarray:
        return self.explanation.all_maps()[self.map_name][self.image_index]

    def caption(self) -> str:
        word = self.trace.answer_texts[self.explanation.token_index]
        caption = map_caption(word, self.map_name, self.explanation.details)
        return f"{caption} \u00b7 image {self.image_index}" if len(self.trace.images) > 1 else caption

    def picture(self) -> Image.Image:
        """The map blended on the image at 448-768 pixels wide, its colour bar (0 to the map's maximum) and the
        caption under it."""
        image = self.trace.image(self.image_index)
        return captioned_map(image, self.grid, self.trace.images[self.image_index], self.caption(), alpha=self.alpha,
                             smooth=self.smooth, width=min(display_width(image), MAX_WIDTH))

    def save(self, path) -> None:
        self.picture().save(path, format="PNG")

    def _repr_png_(self) -> bytes:
        return png_bytes(self.picture())

    def _repr_html_(self) -> str:
        caption = self.caption()  # drawn in the picture; alt and title carry it as text
        return f'<figure style="margin:0">{img_tag(self.picture(), caption, caption)}</figure>'

    def __repr__(self) -> str:
        return f"MapView({self.caption()})"


def show(trace, explanation=None, token_index: int | None = None, *, method: str = "attention", model=None,
         map_name: str | None = None, image_index: int = 0, alpha: float = 0.6, smooth: bool = False, **options):
    """What to display in a notebook: the trace alone; or a map of `explanation` on its image; or, given a
    `token_index`, `method`'s map for that token (computed here; `model` for methods that need it, `options` for
    the method)."""
    if explanation is None and token_index is None:
        return trace
    if explanation is None:
        from .methods import get_method  # the methods import this module for their displays

        explanation = get_method(method).explain(trace, token_index, model=model, **options)
    elif token_index is not None and token_index != explanation.token_index:
        raise UserInputError(f"the explanation is for answer token {explanation.token_index}, not {token_index}: "
                             f"leave token_index out or explain token {token_index}")
    return MapView(trace, explanation, map_name, image_index, alpha, smooth)


# --- analyses ---------------------------------------------------------------------------------------------------
def ablation_repr(result) -> str:
    return (f"AblationResult({result.replacement} ablation of {len(result.positions)} image tokens, token "
            f"{result.token_index} {clip(result.target, 20)!r}: p {result.prob_before:.3g} -> "
            f"{result.prob_after:.3g}, still top-1 {result.still_argmax}, "
            f"answer {'changed' if result.answer_changed else 'unchanged'})")


def ablation_html(result) -> str:
    change = (result.prob_after - result.prob_before) / result.prob_before if result.prob_before > 0 else 0.0
    rows = [["replacement", result.replacement], ["image tokens replaced", str(len(result.positions))],
            ["token", f"{result.token_index} {token_word(result.target)}"],
            ["p before", f"{result.prob_before:.4g}"], ["p after", f"{result.prob_after:.4g}"],
            ["relative change", f"{change:+.1%}"], ["still top-1", "yes" if result.still_argmax else "no"],
            ["answer before", result.answer_before], ["answer after", result.answer_after]]
    return box("Mean ablation" if result.replacement == "mean" else "Zero ablation", table(["", "value"], rows))


def knockout_repr(result) -> str:
    drops = ", ".join(f"{w.window} {d:.0%}" for w, d in zip(result.windows, result.drops()))
    return (f"KnockoutResult(token {result.token_index} {clip(result.target, 20)!r}, p {result.prob_before:.3g}, "
            f"{len(result.queries)} queries x {len(result.keys)} keys blocked; drop by window: {clip(drops, 150)})")


def drop_bar(drop: float) -> str:
    width = int(round(np.clip(drop, 0.0, 1.0) * 100))
    return (f'<div style="width:120px;height:10px;background:#eee"><div style="width:{width}%;height:10px;'
            f'background:#c0392b"></div></div>')


def knockout_html(result) -> str:
    rows = [[html.escape(w.window), html.escape(layer_ranges(w.layers)), f"{w.prob:.4g}", f"{drop:+.1%}",
             drop_bar(drop), "yes" if w.still_argmax else "no"] for w, drop in zip(result.windows, result.drops())]
    title = (f"Attention knockout: token {result.token_index} {token_word(result.target)}, p before "
             f"{result.prob_before:.4g}, {len(result.queries)} query x {len(result.keys)} key positions blocked")
    return box(title, table(["window", "layers", "p after", "relative drop", "", "still top-1"], rows, escape=False))


def logit_lens_repr(lens) -> str:
    return f"LogitLens(layers {layer_ranges(lens.layers)}, {lens.rows}x{lens.cols} cells, top-{lens.probs.shape[-1]})"


def logit_lens_html(lens) -> str:
    rows = []
    for slot, layer in enumerate(lens.layers):
        top1 = lens.probs[slot, :, 0].reshape(lens.rows, lens.cols)
        common = Counter(texts[0] for texts in lens.texts[slot]).most_common(3)
        picture = img_tag(heatmap_picture(top1, HEATMAP_PX // 2), f"top-1 probability, layer {layer}",
                          f"max {float(top1.max()):.4g}")
        tokens = ", ".join(f"{token_word(text)} ({count})" for text, count in common)
        rows.append([str(layer), picture, f"{float(top1.max()):.3g}", html.escape(tokens)])
    return box(f"Logit lens: top-1 token per image cell, {lens.rows}x{lens.cols} cells",
               table(["layer", "top-1 p", "max p", "most frequent top-1 tokens (cells)"], rows, escape=False),
               "<div>colour: the cell's top-1 probability over the layer's max p</div>",
               img_tag(scale_bar(0.0, 1.0, 160), "colour scale: 0 to the layer's max p"))


def visual_relevance_repr(relevance) -> str:
    llr = f", LLR {min(relevance.llr):.2f}..{max(relevance.llr):.2f}" if relevance.llr else ""
    return (f"VisualRelevance({sum(relevance.relevant)} of {len(relevance.relevant)} answer tokens visually "
            f"relevant{llr})")


def visual_relevance_html(relevance) -> str:
    rows = [[str(index), f"{llr:.3f}", f"{with_image:.3f}", f"{blurred:.3f}", "yes" if relevant else "no"]
            for index, (llr, with_image, blurred, relevant) in enumerate(zip(
                relevance.llr, relevance.logprob_image, relevance.logprob_blurred, relevance.relevant))]
    return box("Visually relevant tokens: LLR = log p(token | image) - log p(token | blurred image)",
               table(["answer token", "LLR", "log p image", "log p blurred", "visually relevant"], rows))
