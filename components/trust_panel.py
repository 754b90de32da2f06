"""Which map to believe for the selected token: a verdict in words, each map's deletion / insertion AUC, the
agreement between every pair of maps and how much the token leans on the image (lvlm_interpret.trust)."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
import plotly.graph_objects as go

from lvlm_interpret import ExplainBackend
from lvlm_interpret.rendering import map_label, token_word

WAITING = "Select a token, then press **Judge the maps** (it replays the model a few hundred times: seconds)."


@dataclass
class TrustPanel:
    button: gr.Button
    verdict: gr.Markdown
    faithfulness: gr.Dataframe
    agreement: gr.Plot

    @classmethod
    def build(cls) -> "TrustPanel":
        with gr.Column():
            gr.Markdown("Deletion: the token's probability as the map's top cells are blurred away, first to last "
                        "(lower area: the map found what matters). Insertion: as they are restored into the blurred "
                        "image (higher is better). Agreement: Spearman correlation of two maps over the cells.")
            button = gr.Button("Judge the maps for this token", elem_id="trust-run")
            verdict = gr.Markdown(WAITING, elem_id="trust-verdict")
            faithfulness = gr.Dataframe(headers=["map", "what it is", "deletion AUC", "insertion AUC"],
                                        column_widths=["16%", "48%", "18%", "18%"], interactive=False,
                                        elem_id="trust-faithfulness")
            agreement = gr.Plot(label="Agreement between maps (Spearman)", elem_id="trust-agreement")
        return cls(button, verdict, faithfulness, agreement)

    def outputs(self) -> list:
        return [self.verdict, self.faithfulness, self.agreement]


def cleared() -> tuple:
    """The panel before the current token is judged: nothing of another token's judgement."""
    return WAITING, None, None


def render_trust(service: ExplainBackend, state: dict, options: dict) -> tuple:
    """(verdict, faithfulness rows, agreement figure) of the selected token."""
    trace = service.trace(state["request_id"])
    trust = service.trust(state["request_id"], state["token"], options)
    word = token_word(trace.answer_texts[state["token"]])
    verdict = (f"**{word}** (answer token {state['token']}): {trust['verdict']}  \n"
               f"Image share of relevancy: **{trust['image_share']:.0%}** (text: {1 - trust['image_share']:.0%}); "
               f"p(token) {trust['p_original']:.3f} with the image, {trust['p_blurred']:.3f} with it blurred.")
    rows = [[name, map_label(name), trust["deletion"][name], trust["insertion"][name]] for name in trust["deletion"]]
    names = list(trust["deletion"])
    matrix = np.eye(len(names))
    for pair, values in trust["agreement"].items():
        a, b = pair.split("|")
        rho = np.nan if values["spearman"] is None else values["spearman"]
        matrix[names.index(a), names.index(b)] = matrix[names.index(b), names.index(a)] = rho
    figure = go.Figure(go.Heatmap(z=matrix, x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu", reversescale=True,
                                  text=np.round(matrix, 2), texttemplate="%{text}",
                                  hovertemplate="%{y} vs %{x}: %{z:.2f}<extra></extra>"))
    figure.update_yaxes(autorange="reversed")
    figure.update_layout(title=f"{word}: do the maps agree?", height=420, margin=dict(l=10, r=10, t=40, b=10))
    return verdict, rows, figure
