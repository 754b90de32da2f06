"""Turning grid maps into pictures: colour scales, RGBA overlays the size of the original image, blends."""

from __future__ import annotations

import numpy as np
from PIL import Image
from plotly.colors import get_colorscale, sample_colorscale, unlabel_rgb

from .families.base import ImageLayout


def normalise(grid_map: np.ndarray, ignore_top: int = 0) -> np.ndarray:
    """Scale to [0, 1] by the maximum; `ignore_top` > 0 scales by the (k+1)-th largest cell instead, so a few
    attention-sink cells do not wash out the rest (they saturate)."""
    values = np.clip(np.asarray(grid_map, dtype=np.float32), 0.0, None)
    flat = np.sort(values.ravel())[::-1]
    top = flat[min(ignore_top, flat.size - 1)] if flat.size else 0.0
    return np.clip(values / top, 0.0, 1.0) if top > 0 else np.zeros_like(values)


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
            ignore_top: int = 0, smooth: bool = False) -> Image.Image:
    """An RGBA image the size of the original image: the map stretched over the box its grid covers."""
    levels = (map_on_image(normalise(grid_map, ignore_top), layout, smooth) * 255).round().clip(0, 255)
    rgba = np.zeros((*levels.shape, 4), dtype=np.uint8)
    rgba[..., :3] = colour_lookup(colorscale)[levels.astype(np.uint8)]
    rgba[..., 3] = np.where(inside_box(layout), int(round(alpha * 255)), 0)
    return Image.fromarray(rgba, mode="RGBA")


def blend(image: Image.Image, overlay_image: Image.Image) -> Image.Image:
    """The original image with the overlay composited on top (RGB)."""
    return Image.alpha_composite(image.convert("RGBA"), overlay_image).convert("RGB")


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


def plotly_heatmap(image: Image.Image, grid_map: np.ndarray, layout: ImageLayout, title: str = ""):
    """An interactive figure: the image with the map's cells on top; hovering a cell shows row, column, value."""
    import base64
    import io

    import plotly.graph_objects as go

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
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
    figure.add_layout_image(source="data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(),
                            x=0, y=0, sizex=width, sizey=height, xref="x", yref="y", layer="below",
                            sizing="stretch")
    figure.update_xaxes(range=[0, width], showgrid=False, constrain="domain")
    figure.update_yaxes(range=[height, 0], showgrid=False, scaleanchor="x")
    figure.update_layout(title=title, margin=dict(l=10, r=10, t=30 if title else 10, b=10))
    return figure
