"""The web app: upload an image, ask, click an answer token, see where the model looked.

Run `python app.py [--model NAME] [--port 7860] [--share] [--backend URL]`; this file is also a hosted demo's
entry point. Every panel follows the one selected answer token.
"""

from __future__ import annotations

import argparse
import functools

import gradio as gr

from components import (
    analysis_panel, compare_panel, comparison_panel, linked_views, request_status, sae_panel, share_panel, token_strip,
)
from components.attention_panel import (
    AttentionPanel, attention_options, control_choices, overview_selection, render_views, reverse_view,
)
from components.export_panel import ExportPanel, export
from components.generation import GenerationPanel, run_generation
from components.method_panel import (
    Cancellations, Cancelled, MethodPanel, method_controls, method_names, panel_options, render_method,
)
from components.trust_panel import TrustPanel, render_trust
from components.trust_panel import cleared as trust_cleared
from lvlm_interpret import DEFAULT_MODEL, ExplainBackend, ExplainService, UserInputError
from lvlm_interpret.client import RemoteService
from lvlm_interpret.images import prepare_image
from lvlm_interpret.models.loading import quiet_loading_logs
from lvlm_interpret.ratelimit import RateLimiter
from lvlm_interpret.rendering import display_width
from lvlm_interpret.service import HOSTED_CONFIG, hosted_limits, hosted_service

# the map figures at their own size (at least 448 pixels wide: rendering.display_width), a tall image's too: the
# panels' fixed height would shrink them to its width
CSS = ("#answer-tokens .token-container, .compare-answer .token-container { margin-right: 0.35em; }\n"
       "#attention-map, #method-map { height: auto !important; }\n"
       "#attention-map img, #method-map img { height: auto; max-height: none; }\n" + comparison_panel.TILES_CSS)

try:  # on Hugging Face ZeroGPU Spaces, handlers that compute borrow a GPU
    import spaces

    gpu = spaces.GPU
except ImportError:
    def gpu(handler):
        return handler


def _user_errors(handler):
    """Show a UserInputError as one notice in the page instead of a stack trace."""
    @functools.wraps(handler)  # keeps the signature: Gradio injects gr.SelectData / gr.Progress by it
    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except UserInputError as error:
            raise gr.Error(str(error)) from None
    return wrapped


def build_app(service: ExplainBackend, rate_limiter: RateLimiter | None = None) -> gr.Blocks:
    """The page on `service`; `rate_limiter` (hosted mode) bounds each client address's generations, token clicks
    and method choices per minute."""

    cancellations = Cancellations()  # the method panel's Cancel button, per page session

    def _session(request: gr.Request | None) -> str:
        return request.session_hash if request is not None and request.session_hash else ""

    def check_rate(request: gr.Request | None) -> None:
        if rate_limiter is None or request is None or request.client is None:
            return
        wait = rate_limiter.retry_after(request.client.host)
        if wait is not None:
            raise UserInputError(rate_limiter.message(wait))

    # uploads and shown files are copied into Gradio's cache: a long-running page clears what is an hour old
    with gr.Blocks(title="lvlm_interpret", delete_cache=(600, 3600)) as demo:
        gr.Markdown("## lvlm_interpret\nUpload an image (or pick an example), ask a question, then click any "
                    "answer token: every panel shows where the model looked for that token.")
        session = gr.State({})  # per browser session: request id, image, selected token
        # the gallery renders every method's maps: only while its tab is open (a click stays fast elsewhere)
        gallery_open = gr.State(False)
        with gr.Row():
            with gr.Column(scale=2):
                generation = GenerationPanel.build(service.default_model, service.allowed_models,
                                                   service.max_new_tokens or 128)
            with gr.Column(scale=3):
                # the answer shows once, as the strip of clickable words; the hidden box keeps its text in the page
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer", visible="hidden")
                tokens = token_strip.build()
                status = request_status.build()
                export_panel = ExportPanel.build()
                share = share_panel.SharePanel.build()
                with gr.Tabs() as tabs:
                    with gr.Tab("Attention") as attention_tab:
                        attention = AttentionPanel.build()
                    with gr.Tab("Linked views") as linked_tab:
                        linked = linked_views.build()
                    with gr.Tab("Methods") as method_tab:
                        explanation = MethodPanel.build()
                    with gr.Tab("Side by side") as gallery_tab:
                        comparison = comparison_panel.build()
                    with gr.Tab("Analyses") as analyses_tab:
                        analysis = analysis_panel.AnalysisPanel.build()
                    with gr.Tab("Trust") as trust_tab:
                        trust = TrustPanel.build()
                    with gr.Tab("Compare") as compare_tab:
                        compare = compare_panel.ComparePanel.build(service.default_model, service.allowed_models)
                    with gr.Tab("Features") as features_tab:
                        features = sae_panel.SAEPanel.build()

        other_tabs = (attention_tab, linked_tab, method_tab, analyses_tab, trust_tab, compare_tab, features_tab)

        def render_token(state, layer, head, aggregation, ignore_top, method, map_name, cleann_layer, cleann_head,
                         relevancy_vision, gallery_open=True, progress=None):
            trace = service.trace(state["request_id"])
            relevant = service.visual_relevance(state["request_id"]).relevant
            views = render_views(service, state["request_id"], state["image"], state["token"], layer, head,
                                 aggregation, ignore_top)
            own_controls = (cleann_layer, cleann_head, relevancy_vision)
            method_views = _method_views(state, method, map_name, *own_controls, progress=progress)
            tiles = render_gallery(state, layer, head, aggregation, ignore_top, *own_controls) if gallery_open \
                else gr.skip()
            return (token_strip.strip_value(trace, state["token"], relevant), *views, *method_views, tiles)

        def render_gallery(state, layer, head, aggregation, ignore_top, *own_controls):
            trace = service.trace(state["request_id"])
            return comparison_panel.render_comparison(service, state["request_id"], state["image"], state["token"],
                                                      options=panel_options(trace, *own_controls), layer=layer,
                                                      head=head, aggregation=aggregation, ignore_top=ignore_top)

        def _method_views(state, method, map_name, *own_controls, progress=None):
            """The method panel's outputs; `own_controls`: CLEANN's layer and head, relevancy's vision switch. Until a
            token is picked, a method with an answer-level map (iGOS++) shows it. A run stopped by Cancel leaves the
            panel empty with a note (the other views of a clicked token still show)."""
            trace = service.trace(state["request_id"])
            try:
                picture, names, shown, summary, bars, graph = render_method(
                    service, state["request_id"], state["image"], state["token"] if state.get("picked") else None,
                    method, map_name, panel_options(trace, *own_controls).get(method, {}), progress)
            except Cancelled as stopped:
                gr.Warning(str(stopped))
                return (None, gr.Dropdown(), *method_controls(trace, method, *own_controls), f"*{stopped}*",
                        gr.Plot(None, visible=False), gr.Plot(None, visible=False))
            # the text scores and CLEANN's graph only where the method has them
            return (picture, gr.Dropdown(choices=names, value=shown), *method_controls(trace, method, *own_controls),
                    summary, gr.Plot(bars, visible=bars is not None), gr.Plot(graph, visible=graph is not None))

        @gpu
        @_user_errors
        def on_generate(image, prompt, model, max_new_tokens, temperature, top_p, method=None, map_name=None,
                        cleann_layer=None, cleann_head=None, relevancy_vision=None, gallery_open=True,
                        progress=gr.Progress(), request: gr.Request = None):
            check_rate(request)
            progress(0.1, desc="generating")
            request_id, trace = run_generation(service, image, prompt, model, max_new_tokens, temperature, top_p)
            state = {"request_id": request_id, "image": prepare_image(image), "token": 0}
            layer, head = control_choices(trace.n_layers, trace.n_heads)
            progress(0.6, desc="explaining the first token")
            # the method panel keeps the method and map the user chose
            rendered = render_token(state, "all", "all", "mean", 0, method or method_names()[0], map_name, cleann_layer,
                                    cleann_head, relevancy_vision, gallery_open)
            return (state, trace.answer, layer, head, *rendered)

        @gpu
        @_user_errors
        def on_select(state, layer, head, aggregation, ignore_top, method, map_name, cleann_layer, cleann_head,
                      relevancy_vision, gallery_open, event: gr.SelectData, request: gr.Request = None,
                      progress=gr.Progress()):
            if not state:
                raise UserInputError("generate an answer first")
            check_rate(request)
            state = {**state, "token": int(event.index), "picked": True}
            # a slow method (iGOS++) shows its iterations and stops on Cancel, as when it is chosen
            return (state, *render_token(state, layer, head, aggregation, ignore_top, method, map_name, cleann_layer,
                                         cleann_head, relevancy_vision, gallery_open,
                                         cancellations.progress(progress, _session(request))))

        @_user_errors
        def on_controls(state, layer, head, aggregation, ignore_top, cleann_layer, cleann_head, relevancy_vision,
                        gallery_open=True):
            """The attention views and the open gallery (its attention tile follows the same layers and heads)."""
            if not state:
                return None, None, None, None
            views = render_views(service, state["request_id"], state["image"], state["token"], layer, head,
                                 aggregation, ignore_top)
            tiles = render_gallery(state, layer, head, aggregation, ignore_top, cleann_layer, cleann_head,
                                   relevancy_vision) if gallery_open else gr.skip()
            return (*views, tiles)

        @_user_errors
        def on_overview_click(state, event: gr.SelectData):
            if not state:
                raise UserInputError("generate an answer first")
            trace = service.trace(state["request_id"])
            layer, head = overview_selection(*event.index, trace.n_layers, trace.n_heads)
            return gr.Dropdown(value=layer), gr.Dropdown(value=head)

        @_user_errors
        def on_image_click(state, layer, head, aggregation, event: gr.SelectData):
            if not state:
                raise UserInputError("generate an answer first")
            image = state["image"]  # the figure shows it at display_width
            return reverse_view(service, state["request_id"], *event.index, layer, head, aggregation,
                                display_width(image) / image.width)

        @_user_errors
        def on_method(state, method, map_name, cleann_layer, cleann_head, relevancy_vision,
                      request: gr.Request = None, progress=gr.Progress()):
            check_rate(request)
            if not state:
                return (None, gr.Dropdown(), gr.Dropdown(visible=method == "cleann"),
                        gr.Dropdown(visible=method == "cleann"), gr.Checkbox(visible=method == "relevancy"), "", None,
                        None)
            return _method_views(state, method, map_name, cleann_layer, cleann_head, relevancy_vision,
                                 progress=cancellations.progress(progress, _session(request)))

        def on_cancel(request: gr.Request = None):
            cancellations.ask(_session(request))

        def exporter(kind):
            @_user_errors
            def on_export(state, layer, head, aggregation, cleann_layer, cleann_head, relevancy_vision):
                if not state:
                    raise UserInputError("generate an answer first")
                options = panel_options(service.trace(state["request_id"]), cleann_layer, cleann_head,
                                        relevancy_vision)
                return export(service, state["request_id"], state["token"], kind,
                              {**options, "attention": attention_options(layer, head, aggregation)})
            return on_export

        token_outputs = [tokens, *attention.views(), *explanation.outputs(), comparison]
        # the events that render the selected token's views run one at a time, in the order they came: a token
        # click still computing must not overwrite the method chosen after it
        views = "views"
        # the Generate button, and picking an example scene (once it is loaded into the inputs)
        generate = dict(fn=on_generate, inputs=[*generation.inputs(), *explanation.controls(), gallery_open],
                        outputs=[session, answer, attention.layer, attention.head, *token_outputs],
                        concurrency_id=views)
        generations = [generation.button.click(**generate)]
        if generation.examples is not None:
            generations.append(generation.examples.load_input_event.then(**generate))

        @gpu
        @share_panel.opening_errors
        def on_open_link(asked, request: gr.Request = None):
            """The page opened on a share link: the request, its inputs and the view the link names."""
            check_rate(request)
            view = share_panel.open_link(service, asked, generation.image.GRADIO_CACHE)
            rendered = render_token(view.state, view.layer, view.head, view.aggregation, 0, view.method,
                                    view.map_name, None, None, None, view.tab == "gallery")
            return (view.state, view.trace.answer, *view.attention_choices(), *rendered, *view.inputs(), view.method,
                    view.aggregation, view.tab == "gallery", gr.Tabs(selected=view.tab), view.tab)

        named_tabs = {"attention": attention_tab, "linked": linked_tab, "methods": method_tab, "gallery": gallery_tab,
                      "analyses": analyses_tab, "trust": trust_tab, "compare": compare_tab, "features": features_tab}
        generations.append(share.wire(
            demo, service, session, tabs, named_tabs,
            [explanation.method, explanation.map_name, attention.layer, attention.head, attention.aggregation],
            on_open_link, [session, answer, attention.layer, attention.head, *token_outputs, *generation.inputs(),
                           explanation.method, attention.aggregation, gallery_open], views))

        def after_generation(handler, inputs, outputs):
            for generated in generations:
                generated.success(handler, inputs, outputs)

        after_generation(gpu(_user_errors(functools.partial(analysis_panel.on_new_request, service))), session,
                         [analysis.layer, analysis.lens, analysis.tokens])
        analysis_panel.wire(analysis, service, session, lambda handler: gpu(_user_errors(handler)))
        after_generation(sae_panel.cleared, session, sae_panel.outputs_on_new_request(features))
        sae_panel.wire(features, service, session, lambda handler: gpu(_user_errors(handler)))
        clicked = tokens.select(on_select, [session, *attention.controls(), *explanation.controls(), gallery_open],
                                [session, *token_outputs], concurrency_id=views)
        for control in attention.controls():
            control.change(on_controls, [session, *attention.controls(), *explanation.own_controls(), gallery_open],
                           [*attention.views(), comparison], concurrency_id=views)
        attention.overview.select(on_overview_click, session, [attention.layer, attention.head])

        @gpu
        @_user_errors
        def on_gallery_opened(state, layer, head, aggregation, ignore_top, *own_controls):
            return True, (render_gallery(state, layer, head, aggregation, ignore_top, *own_controls) if state else [])

        gallery_tab.select(on_gallery_opened, [session, *attention.controls(), *explanation.own_controls()],
                           [gallery_open, comparison], concurrency_id=views)
        for tab in other_tabs:
            tab.select(lambda: False, None, gallery_open)
        attention.image.select(on_image_click, [session, attention.layer, attention.head, attention.aggregation],
                               attention.reverse)

        @gpu
        @_user_errors
        def on_linked_views(state, layer, head, aggregation):
            if not state:
                return None
            return linked_views.payload(service, state["request_id"], state["image"], layer, head, aggregation)

        # the cheap maps of every token go to the page once per request and per attention setting; a click there
        # pins the token like a click in the answer strip
        linked_inputs = [session, attention.layer, attention.head, attention.aggregation]
        after_generation(on_linked_views, linked_inputs, linked)
        for control in linked_inputs[1:]:
            control.change(on_linked_views, linked_inputs, linked, concurrency_id=views)
        # the linked views pinned the token already: the server panels catch up with the last pin
        pinned = linked.select(on_select, [session, *attention.controls(), *explanation.controls(), gallery_open],
                               [session, *token_outputs], concurrency_id=views, trigger_mode="always_last")
        # a word clicked in the answer strip is pinned in the linked views too, without waiting for the panels
        tokens.select(linked_views.selected, session, linked)
        method_outputs = explanation.outputs()
        method_events = [control.input(on_method, [session, *explanation.controls()], method_outputs,
                                       concurrency_id=views) for control in explanation.controls()]
        # not in the views group: it must run while the method it stops does
        explanation.cancel.click(on_cancel, None, None, cancels=method_events)
        export_inputs = [session, attention.layer, attention.head, attention.aggregation, *explanation.own_controls()]
        export_panel.pngs.click(exporter("png"), export_inputs, export_panel.files)
        export_panel.request.click(exporter("request"), export_inputs, export_panel.files)
        export_panel.report.click(exporter("report"), export_inputs, export_panel.files)

        # what the views show, and what no longer applies: a new answer clears the last one's reverse view,
        # exports and analyses; a changed prompt or image marks them stale
        def on_new_answer(state):
            return request_status.describe(service, state), None, None, "", None, ""

        after_generation(_user_errors(on_new_answer), session, [status, attention.reverse, export_panel.files,
                                                                analysis.summary, analysis.drops, analysis.box])
        for event in (clicked, pinned):
            event.success(_user_errors(lambda state: request_status.describe(service, state)), session, status)

        @gpu
        @_user_errors
        def on_trust(state, cleann_layer, cleann_head, relevancy_vision, progress=gr.Progress()):
            if not state:
                raise UserInputError("generate an answer first")
            progress(0.1, desc="replaying the model on masked images")
            trace = service.trace(state["request_id"])
            return render_trust(service, state, panel_options(trace, cleann_layer, cleann_head, relevancy_vision))

        trust.button.click(on_trust, [session, *explanation.own_controls()], trust.outputs(), concurrency_id=views)
        # request B is made from the current request A: a new A clears the comparison
        compare_panel.wire(compare, service, session, [generation.max_new_tokens, generation.temperature,
                                                       generation.top_p], lambda handler: gpu(_user_errors(handler)))
        after_generation(compare_panel.cleared, None, compare.outputs())
        for event in (*generations, clicked, pinned):  # another token's judgement is not this one's
            event.success(trust_cleared, None, trust.outputs())

        def on_inputs_changed(state, prompt, image):
            return request_status.stale(state, service, prompt, image)

        inputs_changed = dict(fn=_user_errors(on_inputs_changed), inputs=[session, generation.prompt, generation.image],
                              outputs=status)
        # typed (once per burst of keys: the comparison decodes the image), uploaded or an example
        generation.prompt.input(**inputs_changed, trigger_mode="always_last")
        uploaded = generation.image.change(**inputs_changed)

        @_user_errors
        def on_unreadable_upload(state, prompt):
            """An upload the decoder refused (the notice says why): no broken picture, the views marked stale."""
            return None, request_status.stale(state, service, prompt, None)

        uploaded.failure(on_unreadable_upload, [session, generation.prompt], [generation.image, status])
        keep_panels_on_failure(demo)
    return demo


def keep_panels_on_failure(demo: gr.Blocks) -> None:
    """After a failed event its panels keep what they showed, with no "Error" badge: the notice says what went
    wrong. (Gradio's badge stayed over the panel's later results, and over a picture or the answer strip it took
    every click.) Called last, once every event of the page is wired."""
    for function in list(demo.fns.values()):
        if not function.outputs or function.trigger_only_on_failure:
            continue
        count = len(function.outputs)
        gr.events.Dependency(None, {}, function._id, None).failure(
            lambda count=count: gr.skip() if count == 1 else [gr.skip()] * count, None, function.outputs,
            api_visibility="private")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="lvlm_interpret web app")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder, demo or random:PRESET")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a temporary public link")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", type=int, default=1, help="requests computed at the same time")
    parser.add_argument("--queue", type=int, default=64, help="requests that may wait; more are refused (busy)")
    parser.add_argument("--cache-mb", type=int, default=1024, help="bound of the trace and map cache")
    parser.add_argument("--backend", default=None, help="URL of a running `python -m lvlm_interpret serve`; "
                                                        "without it the model runs in this process")
    parser.add_argument("--hosted", action="store_true", help=f"public-demo limits from {HOSTED_CONFIG.name}: "
                                                              "allowed models, answer length, upload size, "
                                                              "queue, time limit")
    parser.add_argument("--share-link-hours", type=float, default=None,
                        help="the page's Share links expire after this many hours (default: never, only forgotten "
                             f"when too many are kept; --hosted: {HOSTED_CONFIG.name}'s share_link_hours); with "
                             "--backend the backend decides")
    args = parser.parse_args(argv)
    quiet_loading_logs()
    limits = hosted_limits() if args.hosted else {}
    if args.backend:
        service = RemoteService(args.backend)
    else:
        service = hosted_service(args.model, limits, device=args.device) if args.hosted else ExplainService(
            default_model=args.model, device=args.device, cache_bytes=args.cache_mb * 2 ** 20)
        if args.share_link_hours is not None:
            service.share_lifetime_s = args.share_link_hours * 3600
        service.model()  # load before serving, so the first click is fast and a bad --model fails here
    launch(service, limits, args.host, args.port, args.share, args.concurrency, args.queue)


def launch(service: ExplainBackend, limits: dict, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           concurrency: int = 1, queue: int = 64, block: bool = True) -> gr.Blocks:
    """Serve the page; hosted `limits` (empty: none) set concurrency, queue size and upload size."""
    limiter = RateLimiter(limits["rate_limit_per_minute"]) if limits.get("rate_limit_per_minute") else None
    demo = build_app(service, limiter).queue(default_concurrency_limit=limits.get("concurrency", concurrency),
                                    max_size=limits.get("queue", queue))

    @gpu
    def costly_maps(query: dict) -> dict:
        return linked_views.costly_maps(service, query)

    # the linked views fetch their costly maps from a plain route of the page's app, under the page's rate limit
    costly = linked_views.costly_route(costly_maps, limiter)
    demo.launch(server_name=host, server_port=port, share=share, css=CSS, prevent_thread_lock=not block,
                max_file_size=f"{limits['max_upload_mb']}mb" if limits else None, quiet=not block,
                app_kwargs={"routes": [costly]})
    return demo


if __name__ == "__main__":
    main()
