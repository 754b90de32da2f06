"""Plotly figures of the method panel: text scores as bars, CLEANN's causal graph."""

from __future__ import annotations

import plotly.graph_objects as go

from lvlm_interpret import Explanation, TraceView
from lvlm_interpret.methods.base import image_token_positions
from lvlm_interpret.rendering import map_caption


def text_scores_figure(trace: TraceView, explanation: Explanation) -> go.Figure | None:
    """Bars over the prompt's text tokens and earlier answer tokens (image positions left out), titled with the
    token's word."""
    scores = explanation.text_scores
    if scores is None:
        return None
    image = image_token_positions(trace)
    positions = [p for p in range(len(scores)) if p not in image and trace.token_texts[p].strip()]
    labels = [f"{p}:{trace.token_texts[p].strip()}" for p in positions]
    figure = go.Figure(go.Bar(x=labels, y=[float(scores[p]) for p in positions],
                              hovertemplate="%{x}<br>%{y:.4g}<extra></extra>"))
    caption = map_caption(trace.answer_texts[explanation.token_index], explanation.method)
    figure.update_layout(title=f"{caption}: text scores",
                         margin=dict(l=10, r=10, t=30, b=10), height=260)
    return figure


def cleann_graph_figure(trace: TraceView, explanation: Explanation) -> go.Figure | None:
    """CLEANN's learned graph: image nodes at their grid cells, text nodes in a row under the image; the target
    and the explaining set are highlighted."""
    if explanation.method != "cleann":
        return None
    details = explanation.details
    layout = trace.images[0]
    image = image_token_positions(trace)
    text_nodes = [p for p in details["nodes"] if p not in image]

    def place(position):
        cell = layout.cell_of(position)
        if cell is not None:
            return float(cell[1]), float(cell[0])
        if position in image:  # another image or view, or a separator token: not drawn
            return None
        slot = text_nodes.index(position)
        return (slot + 0.5) * layout.cols / max(len(text_nodes), 1), layout.rows + 1.5

    chosen = {tuple(cell) for cell in details["image_cells"]} | set(details["text_tokens"])
    target = trace.source_position(explanation.token_index)
    edge_x, edge_y = [], []
    for a, b in details["edges"]:
        pa, pb = place(a), place(b)
        if pa and pb:
            edge_x += [pa[0], pb[0], None]
            edge_y += [pa[1], pb[1], None]
    nodes = [(p, place(p)) for p in details["nodes"] if place(p)]
    colours = ["#dc2626" if p == target else "#f59e0b" if p in chosen or layout.cell_of(p) in chosen else "#60a5fa"
               for p, _ in nodes]
    labels = [f"{p}:{trace.token_texts[p].strip() or 'image'}" for p, _ in nodes]
    figure = go.Figure([
        go.Scatter(x=edge_x, y=edge_y, mode="lines", line=dict(color="#9ca3af", width=1), hoverinfo="skip"),
        go.Scatter(x=[xy[0] for _, xy in nodes], y=[xy[1] for _, xy in nodes], mode="markers",
                   marker=dict(size=10, color=colours), text=labels, hovertemplate="%{text}<extra></extra>"),
    ])
    figure.update_yaxes(autorange="reversed", visible=False)
    figure.update_xaxes(visible=False)
    figure.update_layout(showlegend=False, height=320, margin=dict(l=10, r=10, t=30, b=10),
                         title=f"CLEANN graph (layer {details['layer']}, head {details['head']}): red target, "
                               "orange explaining set")
    return figure
