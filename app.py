"""The web app: upload an image, ask, click an answer token, see where the model looked.

Run `python app.py [--model NAME] [--port 7860] [--share]`; this file is also a hosted demo's entry point.
"""

from __future__ import annotations

import argparse

import gradio as gr

from components import token_strip
from components.attention_panel import AttentionPanel, control_choices, render_attention
from components.generation import GenerationPanel, run_generation
from components.method_panel import MethodPanel, method_names, render_method
from lvlm_interpret import DEFAULT_MODEL, ExplainService, UserInputError
from lvlm_interpret.client import RemoteService
from lvlm_interpret.images import prepare_image


CSS = "#answer-tokens .token-container { margin-right: 0.35em; }"


def build_app(service: ExplainService) -> gr.Blocks:
    with gr.Blocks(title="lvlm_interpret") as demo:
        gr.Markdown("## lvlm_interpret\nUpload an image, ask a question, then click any answer token to see "
                    f"where the model looked. Model: `{service.default_model}`.")
        session = gr.State({})  # per browser session: request id, image, selected token
        with gr.Row():
            generation = GenerationPanel.build()
            with gr.Column():
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                tokens = token_strip.build()
                attention = AttentionPanel.build()
                explanation = MethodPanel.build()

        def on_generate(image, prompt, max_new_tokens):
            try:
                request_id, trace = run_generation(service, image, prompt, max_new_tokens)
            except UserInputError as error:
                raise gr.Error(str(error)) from None
            state = {"request_id": request_id, "image": prepare_image(image), "token": 0}
            layer, head = control_choices(trace.n_layers, trace.n_heads)
            picture = render_attention(service, request_id, state["image"], 0)
            return (state, trace.answer, token_strip.strip_value(trace, 0), layer, head, picture,
                    *_render_method(state, method_names()[0], None))

        def on_select(state, layer, head, aggregation, ignore_top, method, map_name, event: gr.SelectData):
            if not state:
                raise gr.Error("generate an answer first")
            state = {**state, "token": int(event.index)}
            trace = service.trace(state["request_id"])
            picture = _render(state, layer, head, aggregation, ignore_top)
            return (state, token_strip.strip_value(trace, state["token"]), picture,
                    *_render_method(state, method, map_name))

        def on_method(state, method, map_name):
            return _render_method(state, method, map_name) if state else (None, gr.Dropdown(), "")

        def _render_method(state, method, map_name):
            try:
                picture, names, shown, summary = render_method(service, state["request_id"], state["image"],
                                                               state["token"], method, map_name)
            except UserInputError as error:
                raise gr.Error(str(error)) from None
            return picture, gr.Dropdown(choices=names, value=shown), summary

        def on_controls(state, layer, head, aggregation, ignore_top):
            return _render(state, layer, head, aggregation, ignore_top) if state else None

        def _render(state, layer, head, aggregation, ignore_top):
            try:
                return render_attention(service, state["request_id"], state["image"], state["token"], layer, head,
                                        aggregation, ignore_top)
            except UserInputError as error:
                raise gr.Error(str(error)) from None

        method_outputs = [explanation.image, explanation.map_name, explanation.summary]
        generation.button.click(
            on_generate, [generation.image, generation.prompt, generation.max_new_tokens],
            [session, answer, tokens, attention.layer, attention.head, attention.image, *method_outputs],
        )
        tokens.select(on_select, [session, *attention.controls(), explanation.method, explanation.map_name],
                      [session, tokens, attention.image, *method_outputs])
        explanation.method.input(on_method, [session, explanation.method, explanation.map_name], method_outputs)
        explanation.map_name.input(on_method, [session, explanation.method, explanation.map_name], method_outputs)
        for control in attention.controls():
            control.change(on_controls, [session, *attention.controls()], attention.image)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="lvlm_interpret web app")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder or random:PRESET")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a temporary public link")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default=None, help="URL of a running `python -m lvlm_interpret serve`; "
                                                        "without it the model runs in this process")
    args = parser.parse_args(argv)
    if args.backend:
        service = RemoteService(args.backend)
    else:
        service = ExplainService(default_model=args.model, device=args.device)
        service.model()  # load before serving, so the first click is fast and a bad --model fails here
    build_app(service).queue().launch(server_name=args.host, server_port=args.port, share=args.share,
                                      css=CSS)


if __name__ == "__main__":
    main()
