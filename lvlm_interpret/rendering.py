"""Turning grid maps into pictures: colour scales, RGBA overlays the size of the original image, blends, and
legible figures (the blend with a colour bar of its scale and a caption saying what it shows)."""

from __future__ import annotations

import base64
import functools
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from plotly.colors import get_colorscale, sample_colorscale, unlabel_rgb

from .errors import UserInputError
from .families.base import ImageLayout

# What each map shows, in the words of its method's description (methods/*.py `description`)
MAP_LABELS = {
    "attention": "Attention of the token's position over the image",
    "relevancy": "Relevancy through the language model",
    "relevancy_vit": "Relevancy through the vision tower",
    "relevancy_all": "Relevancy through the vision tower and the language model",
    "tam": "TAM (interference removed, denoised)",
    "tam_raw": "TAM (raw, before interference removal)",
    "tam_cleaned": "TAM (interference removed, before denoising)",
    "cleann": "CLEANN's explaining image patches",
    "igos": "iGOS++ saliency (1 - optimised mask)",
    "igos_answer": "iGOS++ saliency of the answer's visually relevant tokens",
}
# maps in the page are at least this wide: legible on a 1400-pixel window
MIN_DISPLAY_WIDTH = 448


def map_label(name: str) -> str:
    """A map's name (`tam_raw`, `relevancy_vit`, ...) in words a reader understands; unknown names as they are."""
    return MAP_LABELS.get(name, name)


def token_word(text: str) -> str:
    """An answer token as a caption shows it: quoted and trimmed, or its repr when it is only whitespace."""
    return f"\u201c{text.strip()}\u201d" if text.strip() else repr(text)


def map_caption(word: str, map_name: str, details: dict | None = None) -> str:
    """A caption line: the token's word, what the map shows, and the layers / heads it reads when known (from
    the explanation's details: attention's layers, heads and aggregation, CLEANN's layer and head)."""
    details = details or {}
    parts = [token_word(word), map_label(map_name)]
    several = False
    for unit in ("layer", "head"):
        chosen = details.get(f"{unit}s", details.get(unit))
        if chosen is None:
            continue
        one = isinstance(chosen, int) or str(chosen).strip().lstrip("-").isdigit()
        several |= not one
        parts.append(f"{unit} {chosen}" if one else f"{unit}s {chosen}")
    if several and "aggregation" in details:
        parts.append(f"{details['aggregation']} over them")
    return " \u00b7 ".join(parts)


def colour_range(grid_map: np.ndarray, ignore_top: int = 0, vmin: float | None = None,
                 vmax: float | None = None) -> tuple[float, float]:
    """The values that get the bottom and top colours: by default 0 and the map's maximum (with `ignore_top` = k
    the (k+1)-th largest cell, so a few attention-sink cells do not wash out the rest); a given `vmin` / `vmax`
    instead, for one scale shared across maps."""
    if not all(value is None or np.isfinite(value) for value in (vmin, vmax)):
        raise UserInputError(f"the colour scale needs finite bounds, got {vmin} to {vmax}")
    if vmin is not None and vmax is not None and vmax <= vmin:
        raise UserInputError(f"the colour scale's maximum ({vmax:g}) must be above its minimum ({vmin:g})")
    if vmax is None:
        values = np.clip(np.asarray(grid_map, dtype=np.float32), 0.0, None)
        flat = np.sort(values.ravel())[::-1]
        vmax = float(flat[min(ignore_top, flat.size - 1)]) if flat.size else 0.0
    # a map without a finite maximum (all zero, NaN) shows in the bottom colour
    return 0.0 if vmin is None else float(vmin), float(vmax) if np.isfinite(vmax) else 0.0


def normalise(grid_map: np.ndarray, ignore_top: int = 0, vmin: float | None = None,
              vmax: float | None = None) -> np.ndarray:
    """Scale to [0, 1] over `colour_range` (values outside it saturate); all zeros when the range is empty."""
    low, high = colour_range(grid_map, ignore_top, vmin, vmax)
    values = np.asarray(grid_map, dtype=np.float32)
    if high <= low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def colour_lookup(colorscale: str = "Inferno", levels: int = 256) -> np.ndarray:
    """[levels, 3] uint8 colours sampled from a plotly colour scale."""
    colours = sample_colorscale(get_colorscale(colorscale), np.linspace(0, 1, levels))
    return np.array([unlabel_rgb(colour) for colour in colours], dtype=np.float32).round().astype(np.uint8)


def map_on_image(grid_map: np.ndarray, layout: ImageLayout, smooth: bool = False) -> np.ndarray:
    """The grid map stretched over the box it covers, as a float [height, width] array the size of the original
    image (0 outside the box)."""
    width, height = layout.image_size
    x0, y0, x1, y1 = (int(round(v)) for v in layout.box)
    scaled = Image.fromarray(np.asarray(grid_map, dtype=np.float32), mode="F").resize(
        (max(x1 - x0, 1), max(y1 - y0, 1)), Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    )
    canvas = Image.new("F", (width, height), 0.0)
    canvas.paste(scaled, (x0, y0))
    return np.asarray(canvas, dtype=np.float32)


def inside_box(layout: ImageLayout) -> np.ndarray:
    """[height, width] bool: the original-image pixels that the grid covers."""
    return map_on_image(np.ones((layout.rows, layout.cols), dtype=np.float32), layout) > 0


def overlay(grid_map: np.ndarray, layout: ImageLayout, *, alpha: float = 0.6, colorscale: str = "Inferno",
            ignore_top: int = 0, smooth: bool = False, vmin: float | None = None,
            vmax: float | None = None) -> Image.Image:
    """An RGBA image the size of the original image: the map stretched over the box its grid covers, `alpha` its
    opacity, cell-exact or `smooth` (bilinear), coloured over `colour_range`."""
    if not 0.0 <= alpha <= 1.0:
        raise UserInputError(f"the overlay's opacity must be between 0 and 1, got {alpha}")
    levels = (map_on_image(normalise(grid_map, ignore_top, vmin, vmax), layout, smooth) * 255).round().clip(0, 255)
    rgba = np.zeros((*levels.shape, 4), dtype=np.uint8)
    rgba[..., :3] = colour_lookup(colorscale)[levels.astype(np.uint8)]
    rgba[..., 3] = np.where(inside_box(layout), int(round(alpha * 255)), 0)
    return Image.fromarray(rgba, mode="RGBA")


def blend(image: Image.Image, overlay_image: Image.Image) -> Image.Image:
    """The original image with the overlay composited on top (RGB)."""
    return Image.alpha_composite(image.convert("RGBA"), overlay_image).convert("RGB")


BACKGROUND, INK = (255, 255, 255), (20, 20, 20)


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's scalable built-in font: nothing to download


def font_size(width: int) -> int:
    """Text size for a figure `width` pixels wide: readable at 1:1 and when a wide figure is shown smaller."""
    return max(12, round(width / 34))


def scale_labels(vmin: float, vmax: float) -> list[str]:
    """The values a colour bar prints: its minimum, middle and maximum."""
    return [f"{value:.3g}" for value in (vmin, (vmin + vmax) / 2, vmax)]


def colour_bar(length: int, thickness: int = 14, colorscale: str = "Inferno", vertical: bool = True) -> Image.Image:
    """The colour scale as a strip `length` pixels long: low to high from bottom to top (vertical) or from left to
    right, matching `overlay` and `grid_picture` (0 to the map's maximum)."""
    ramp = colour_lookup(colorscale)[np.linspace(0, 255, max(length, 1)).round().astype(np.uint8)]  # [length, 3]
    strip = np.repeat(ramp[::-1, None], thickness, axis=1) if vertical else np.repeat(ramp[None], thickness, axis=0)
    return Image.fromarray(np.ascontiguousarray(strip), mode="RGB")


def scale_bar(vmin: float, vmax: float, width: int, colorscale: str = "Inferno",
              size: int | None = None) -> Image.Image:
    """A horizontal colour bar with its scale, `width` pixels wide: the colour strip from `vmin` (left) to `vmax`
    (right), with a tick and the value at both ends and the middle; text `size` pixels high (default:
    `font_size`)."""
    size = size or font_size(width)
    font, margin = _font(size), size // 2
    strip_height, tick = size, max(3, size // 3)
    bar = Image.new("RGB", (width, margin + strip_height + tick + round(size * 1.3) + margin // 2), BACKGROUND)
    left, right = margin, max(width - margin, margin + 2)
    bar.paste(colour_bar(right - left, strip_height, colorscale, vertical=False), (left, margin))
    draw = ImageDraw.Draw(bar)
    top = margin + strip_height
    for x, label, anchor in zip((left, (left + right - 1) // 2, right - 1), scale_labels(vmin, vmax),
                                ("la", "ma", "ra")):
        draw.line([(x, top), (x, top + tick)], fill=INK, width=1)
        draw.text((x, top + tick), label, fill=INK, font=font, anchor=anchor)
    return bar


def _wrapped(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def caption_strip(caption: str, width: int, size: int | None = None) -> Image.Image:
    """The caption as lines of text, wrapped to `width` pixels."""
    size = size or font_size(width)
    font, margin, line_height = _font(size), size // 2, round(size * 1.3)
    lines = _wrapped(caption, font, width - 2 * margin)
    strip = Image.new("RGB", (width, margin + line_height * len(lines)), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((margin, line_height * i), line, fill=INK, font=font)
    return strip


def captioned_map(image: Image.Image, grid_map: np.ndarray, layout: ImageLayout, caption: str,
                  vmin: float | None = None, vmax: float | None = None, alpha: float = 0.6, smooth: bool = False,
                  width: int | None = None, ignore_top: int = 0, colorscale: str = "Inferno") -> Image.Image:
    """A legible figure: the map blended over the image (`width` pixels wide, default the image's own width, at
    its aspect ratio) on top, then the colour bar of its scale, then the caption; (vmin, vmax) as in
    `colour_range`, e.g. one scale shared across methods or tokens."""
    low, high = colour_range(grid_map, ignore_top, vmin, vmax)
    layer = overlay(grid_map, layout, alpha=alpha, colorscale=colorscale, ignore_top=ignore_top, smooth=smooth,
                    vmin=vmin, vmax=vmax)
    width = width or image.width
    size = (width, max(1, round(image.height * width / image.width)))
    if size != image.size:  # the photo resampled smoothly, the map's cells kept sharp
        image = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        layer = layer.resize(size, Image.Resampling.NEAREST)
    parts = [blend(image, layer), scale_bar(low, high, width, colorscale), caption_strip(caption, width)]
    figure = Image.new("RGB", (width, sum(part.height for part in parts)), BACKGROUND)
    top = 0
    for part in parts:
        figure.paste(part, (0, top))
        top += part.height
    return figure


def display_width(image: Image.Image) -> int:
    """The width the page shows a map figure at: the image's own, but at least `MIN_DISPLAY_WIDTH`."""
    return max(MIN_DISPLAY_WIDTH, image.width)


def grid_picture(values: np.ndarray, cell_px: int = 24, colorscale: str = "Inferno") -> Image.Image:
    """A [rows, cols] matrix as a picture of coloured cells (e.g. the layer x head overview)."""
    levels = (normalise(values) * 255).round().astype(np.uint8)
    picture = Image.fromarray(colour_lookup(colorscale)[levels], mode="RGB")
    return picture.resize((values.shape[1] * cell_px, values.shape[0] * cell_px), Image.Resampling.NEAREST)


def cell_at(layout: ImageLayout, x: float, y: float) -> tuple[int, int] | None:
    """The grid cell under pixel (x, y) of the original image, or None outside the grid's box."""
    x0, y0, x1, y1 = layout.box
    if not (x0 <= x < x1 and y0 <= y < y1):
        return None
    return int((y - y0) / (y1 - y0) * layout.rows), int((x - x0) / (x1 - x0) * layout.cols)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_uri(image: Image.Image) -> str:
    """The picture inline, for HTML (reports, notebooks, the page's own scripts) and Plotly."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def plotly_heatmap(image: Image.Image, grid_map: np.ndarray, layout: ImageLayout, title: str = ""):
    """An interactive figure: the image with the map's cells on top; hovering a cell shows row, column, value."""
    import plotly.graph_objects as go

    x0, y0, x1, y1 = layout.box
    xs = x0 + (np.arange(layout.cols) + 0.5) * (x1 - x0) / layout.cols
    ys = y0 + (np.arange(layout.rows) + 0.5) * (y1 - y0) / layout.rows
    rows, cols = np.indices(grid_map.shape)
    figure = go.Figure(go.Heatmap(
        z=grid_map, x=xs, y=ys, colorscale="Inferno", opacity=0.6,
        customdata=np.stack([rows, cols], axis=-1),
        hovertemplate="row %{customdata[0]}, col %{customdata[1]}<br>value %{z:.4g}<extra></extra>",
    ))
    width, height = layout.image_size
    figure.add_layout_image(source=png_data_uri(image.convert("RGB")),
                            x=0, y=0, sizex=width, sizey=height, xref="x", yref="y", layer="below",
                            sizing="stretch")
    figure.update_xaxes(range=[0, width], showgrid=False, constrain="domain")
    figure.update_yaxes(range=[height, 0], showgrid=False, scaleanchor="x")
    figure.update_layout(title=title, margin=dict(l=10, r=10, t=30 if title else 10, b=10))
    return figure
