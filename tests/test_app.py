"""The web page's handlers: generate, then a clicked token's overlay."""

import numpy as np
import pytest
from PIL import Image

from app import build_app
from components import token_strip
from components.attention_panel import render_attention
from components.generation import run_generation
from lvlm_interpret import ExplainService, UserInputError, get_method
from lvlm_interpret.rendering import blend, captioned_map, map_caption, overlay, token_word
from tests.conftest import make_scene


@pytest.fixture(scope="module")
def service():
    return ExplainService(default_model="random:llava", device="cpu")


def test_clicked_token_gets_its_own_overlay(service):
    image = make_scene(160, 96)
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=5)
    strip = token_strip.strip_value(trace, 2)
    assert [text for text, _ in strip] == trace.answer_texts
    assert [label for _, label in strip].count(token_strip.SELECTED) == 1 and strip[2][1] == token_strip.SELECTED
    pictures = [render_attention(service, request_id, image, t) for t in (0, 1)]
    for t, picture in enumerate(pictures):
        # at least 448 pixels wide at the image's aspect ratio, the colour bar and caption below
        assert isinstance(picture, Image.Image) and picture.width == 448 and picture.height > 448 * 96 // 160
        explanation = get_method("attention").explain(trace, t)
        caption = map_caption(trace.answer_texts[t], "attention", explanation.details)
        expected = captioned_map(image, explanation.maps[0], trace.images[0], caption, width=448)
        top = 448 * 96 // 160
        assert np.array_equal(np.asarray(picture)[:top], np.asarray(expected)[:top])  # the same map, cell for cell
    assert not np.array_equal(np.asarray(pictures[0]), np.asarray(pictures[1]))
    layer_view = render_attention(service, request_id, image, 0, layer="1", head="0", aggregation="max")
    assert not np.array_equal(np.asarray(layer_view), np.asarray(pictures[0]))


def test_generation_without_image_is_a_user_error(service):
    with pytest.raises(UserInputError, match="upload an image"):
        run_generation(service, None, "Describe the image.", max_new_tokens=5)


def test_app_builds(service):
    assert build_app(service) is not None


def test_strip_marks_visually_relevant_tokens(service):
    image = make_scene(160, 96)
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=4)
    strip = token_strip.strip_value(trace, 0, [False, True, False, True])
    assert [label for _, label in strip] == [token_strip.SELECTED, token_strip.VISUAL, None, token_strip.VISUAL]
    assert len(service.visual_relevance(request_id).relevant) == trace.n_answer


def test_side_by_side_has_every_map_at_one_size(service):
    import gradio as gr

    from components import comparison_panel
    from components.comparison_panel import comparison_tiles, render_comparison

    image = make_scene(320, 192)
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=3)
    tiles = comparison_tiles(service, request_id, image, 1)
    assert {"attention", "relevancy", "relevancy_vit", "relevancy_all", "tam", "tam_raw", "tam_cleaned",
            "cleann"} == set(tiles)
    assert len({picture.size for picture in tiles.values()}) == 1
    # wide enough to read, the image at its aspect ratio on top, its colour bar and caption below (not over it)
    width, height = tiles["tam_raw"].size
    assert width >= 320 and height > width * image.height / image.width
    raw = get_method("tam").explain(trace, 1, model=service.model()).variants["raw"][0]
    figure = captioned_map(image, raw, trace.images[0], map_caption(trace.answer_texts[1], "tam_raw"), width=width)
    assert np.array_equal(np.asarray(tiles["tam_raw"])[: figure.height], np.asarray(figure))
    # the gallery shows the same tiles, losslessly, with no caption labels of its own over the maps
    shown = render_comparison(service, request_id, image, 1)
    assert [np.asarray(p).tolist() for p in shown] == [np.asarray(p).tolist() for p in tiles.values()]
    with gr.Blocks():
        gallery = comparison_panel.build()
    sent = gallery.postprocess(shown).root
    assert all(item.caption is None and item.image.path.endswith(".png") for item in sent)
    assert np.array_equal(np.asarray(Image.open(sent[0].image.path).convert("RGB")), np.asarray(shown[0]))


def test_side_by_side_attention_follows_the_attention_panel(service):
    from components.comparison_panel import comparison_tiles

    image = make_scene(320, 192)
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=3)
    everything = comparison_tiles(service, request_id, image, 1, methods=["attention"])["attention"]
    chosen = comparison_tiles(service, request_id, image, 1, methods=["attention"], layer="1", head="0",
                              aggregation="max")["attention"]
    explanation = get_method("attention").explain(trace, 1, layers="1", heads="0", aggregation="max")
    caption = map_caption(trace.answer_texts[1], "attention", explanation.details)
    assert "layer 1 \u00b7 head 0" in caption
    figure = captioned_map(image, explanation.maps[0], trace.images[0], caption, width=chosen.width)
    assert np.array_equal(np.asarray(chosen)[: figure.height], np.asarray(figure))
    assert not np.array_equal(np.asarray(chosen), np.asarray(everything))


def test_exports(service):
    import html
    import json

    from components.export_panel import export

    image = make_scene(160, 96)
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=3)
    pngs = export(service, request_id, 2, "png")
    assert any(p.endswith("tam_raw_token2.png") for p in pngs)
    # each PNG: the map over the image at the image's size, then its colour bar and caption below
    for path in pngs:
        png = Image.open(path)
        assert png.width == image.width and png.height > image.height
    (raw_png,) = [p for p in pngs if p.endswith("tam_raw_token2.png")]
    raw = get_method("tam").explain(trace, 2, model=service.model()).variants["raw"][0]
    assert np.array_equal(np.asarray(Image.open(raw_png).convert("RGB"))[: image.height],
                          np.asarray(blend(image, overlay(raw, trace.images[0]))))
    assert np.array_equal(np.asarray(Image.open(raw_png).convert("RGB")), np.asarray(captioned_map(
        image, raw, trace.images[0], map_caption(trace.answer_texts[2], "tam_raw"))))
    result_path, maps_path = export(service, request_id, 2, "request")
    result = json.loads(open(result_path).read())
    assert len(result["tokens"]) == trace.n_answer and set(result["cleann"]) == {"2"}
    assert np.load(maps_path)["relevancy"].shape == (trace.n_answer, 8, 8)
    (report,) = export(service, request_id, 2, "report")
    text = open(report).read()
    assert text.count("data:image/png;base64,") == 8 and "http" not in text.replace("http-equiv", "")
    # the token's word and what each map shows, not bare names
    assert html.escape(token_word(trace.answer_texts[2])) in text
    assert html.escape(map_caption(trace.answer_texts[2], "tam_raw")) in text
    # CLEANN's layer and head as the page set them reach the export
    result_path, _ = export(service, request_id, 2, "request", {"cleann": {"layer": 0, "head": 1}})
    result = json.loads(open(result_path).read())
    assert (result["cleann"]["2"]["layer"], result["cleann"]["2"]["head"]) == (0, 1)
    assert result["method_options"]["cleann"] == {"layer": 0, "head": 1}


def test_method_panel_shows_each_registered_method(service):
    from components.method_panel import method_names, render_method

    image = make_scene(160, 96)
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=4)
    assert {"relevancy", "tam", "cleann"} <= set(method_names())
    picture, names, shown, _, bars, graph = render_method(service, request_id, image, 1, "tam", "tam_raw")
    assert graph is None and len(bars.data[0].y) > 0
    assert bars.layout.title.text == f"{map_caption(trace.answer_texts[1], 'tam')}: text scores"  # the word, not "1"
    assert shown == "tam_raw" and {name for _, name in names} == {"tam", "tam_raw", "tam_cleaned"}
    assert dict((name, label) for label, name in names)["tam_raw"] == "TAM (raw, before interference removal)"
    raw = get_method("tam").explain(trace, 1, model=service.model()).variants["raw"][0]
    expected = captioned_map(image, raw, trace.images[0], map_caption(trace.answer_texts[1], "tam_raw"), width=448)
    assert np.array_equal(np.asarray(picture), np.asarray(expected))
    _, names, shown, summary, _, graph = render_method(service, request_id, image, 1, "cleann")
    assert shown == "cleann" and service.explain(request_id, "cleann", 1).details["message"] in summary
    details = service.explain(request_id, "cleann", 1).details
    assert len(graph.data[1].x) == len(details["nodes"])  # every node drawn (one image)
    assert sum(x is None for x in graph.data[0].x) == len(details["edges"])  # every edge drawn


def test_the_methods_own_controls_in_the_panel_reach_the_methods(service):
    from components.method_panel import method_controls, panel_options, render_method

    image = make_scene(160, 96)
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=4)
    layer, head, vision = method_controls(trace, "cleann", "0", "1", True)
    assert layer.choices[0][0] == "default" and len(layer.choices) == trace.n_layers + 1
    assert len(head.choices) == trace.n_heads + 1 and layer.visible and head.visible and not vision.visible
    options = panel_options(trace, "0", "1", True)
    assert options == {"cleann": {"layer": 0, "head": 1}, "relevancy": {}}
    _, _, _, summary, _, _ = render_method(service, request_id, image, 1, "cleann", None, options["cleann"])
    assert "(layer 0, head 1)" in summary
    # relevancy without the tower: the LM map and no vision variants
    layer, head, vision = method_controls(trace, "relevancy", "0", "1", False)
    assert vision.visible and not layer.visible
    _, names, _, _, _, _ = render_method(service, request_id, image, 1, "relevancy", "relevancy_vit",
                                         panel_options(trace, None, None, False)["relevancy"])
    assert [name for _, name in names] == ["relevancy"]
    # choices another model's trace allowed fall back to the defaults, which are left out of the options
    assert panel_options(trace, "99", "42", None) == {"cleann": {}, "relevancy": {}}


def test_examples_ask_questions_their_scenes_can_answer():
    from components.generation import examples

    import json

    from components.generation import EXAMPLES_FILE
    from lvlm_interpret.demo.scenes import answer_for, draw_scene

    assert len(examples()) >= 3
    for item in json.loads(EXAMPLES_FILE.read_text()):
        scene = draw_scene(item["seed"], tuple(item["size"]))  # the example is this scene, redrawn
        assert np.array_equal(np.asarray(Image.open(EXAMPLES_FILE.parent / item["image"])), np.asarray(scene.image))
        answer_for(item["prompt"], scene)  # raises for a question the scene cannot answer


def test_overview_click_and_reverse_view(service):
    from components.attention_panel import (
        OVERVIEW_CELL_PX, OVERVIEW_LEFT_PX, OVERVIEW_TOP_PX, overview_picture, overview_selection, render_views,
        reverse_view,
    )
    from lvlm_interpret.methods.attention import attention_overview, reverse_attention

    image = make_scene(160, 96)
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=4)
    picture, figure, overview = render_views(service, request_id, image, 1)
    assert overview.width > OVERVIEW_LEFT_PX + trace.n_heads * OVERVIEW_CELL_PX  # axes and a colour bar around
    assert overview.height > OVERVIEW_TOP_PX + trace.n_layers * OVERVIEW_CELL_PX
    assert figure.data[0].z.shape == (8, 8)  # the interactive heatmap holds the token's grid
    assert trace.answer_texts[1].strip() in figure.layout.title.text  # titled by the word, not its index
    assert overview_selection(OVERVIEW_LEFT_PX + OVERVIEW_CELL_PX * 3 + 5, OVERVIEW_TOP_PX + OVERVIEW_CELL_PX * 2 + 1,
                              trace.n_layers, trace.n_heads) == ("2", "3")
    # the chosen layer and head are outlined: the cell's border changes, the others do not
    mass = np.full((trace.n_layers, trace.n_heads), 0.5)
    plain, marked = (np.asarray(overview_picture(mass, *chosen)) for chosen in [("all", "all"), ("1", "2")])
    changed = np.argwhere((plain != marked).any(axis=-1))
    top, left = OVERVIEW_TOP_PX + OVERVIEW_CELL_PX, OVERVIEW_LEFT_PX + 2 * OVERVIEW_CELL_PX
    assert changed.min(axis=0).tolist() == [top, left]
    assert changed.max(axis=0).tolist() == [top + OVERVIEW_CELL_PX - 1, left + OVERVIEW_CELL_PX - 1]
    with pytest.raises(UserInputError):
        overview_selection(5, OVERVIEW_CELL_PX * 99, trace.n_layers, trace.n_heads)
    # pixel (80, 10) of a 160x96 image: centre-cropped box x 32..128 -> column 4, row 0
    scored = reverse_view(service, request_id, 80, 10)
    expected = reverse_attention(trace, [(0, 4)])
    assert [text for text, _ in scored] == trace.answer_texts
    np.testing.assert_allclose([score for _, score in scored], expected / expected.max(), atol=1e-4)
    with pytest.raises(UserInputError, match="outside"):
        reverse_view(service, request_id, 5, 10)
    assert attention_overview(trace, 1)["image"].shape == (trace.n_layers, trace.n_heads)


def test_hosted_limits():
    from components.generation import model_choices

    hosted = ExplainService(default_model="random:llava", device="cpu", allowed_models=["random:llava"],
                            max_new_tokens=8)
    with pytest.raises(UserInputError, match="not offered"):
        run_generation(hosted, make_scene(), "Describe the image.", model="nobody/arbitrary-hub-model")
    with pytest.raises(UserInputError, match="limited to 8"):
        run_generation(hosted, make_scene(), "Describe the image.", max_new_tokens=9)
    _, trace = run_generation(hosted, make_scene(), "Describe the image.", max_new_tokens=8)
    assert trace.n_answer <= 8
    assert [name for _, name in model_choices("random:llava", ["random:llava"])] == ["random:llava"]
    labels = dict((name, label) for label, name in model_choices("demo"))
    assert "random:qwen2_vl" in labels and "untrained" in labels["random:qwen2_vl"]
    assert "coloured shapes only" in labels["demo"]  # the picker says what the demo model knows
    assert "Qwen2-VL" in labels["demo-qwen2_vl"] and "coloured shapes only" in labels["demo-qwen2_vl"]


def test_dockerfile_runs_the_same_entry_with_the_same_requirements():
    from pathlib import Path

    dockerfile = (Path(__file__).resolve().parents[1] / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM nvidia/cuda:")  # a CUDA base for GPU deployment
    assert any("-r requirements.txt" in line for line in lines)
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert "EXPOSE 7860" in lines
    entry = next(line for line in lines if line.startswith("ENTRYPOINT"))
    assert "app.py" in entry and "7860" in entry


def test_a_new_generation_keeps_the_method_and_map_shown(service):
    import gradio as gr

    from app import build_app

    on_generate = next(f.fn for f in build_app(service).fns.values() if f.name == "on_generate")
    outputs = on_generate(make_scene(160, 96), "Describe the image.", "random:llava", 4, 0, 1, "relevancy",
                          "relevancy_vit", None, None, progress=lambda *a, **k: None)
    shown = [o.value for o in outputs if isinstance(o, gr.Dropdown) and o.value and str(o.value).startswith("rel")]
    assert shown == ["relevancy_vit"]


def test_events_that_render_the_token_views_run_one_at_a_time_in_order(service):
    """A token click still computing (its gallery computes every method) must not overwrite a method chosen after
    it: those events share one concurrency group, so the queue runs them in the order they came."""
    from app import build_app

    groups = {f.name: f.concurrency_id for f in build_app(service).fns.values()
              if f.name in ("on_generate", "on_select", "on_controls", "on_method")}
    assert set(groups) == {"on_generate", "on_select", "on_controls", "on_method"}
    assert len(set(groups.values())) == 1


def test_a_long_running_page_clears_its_temporary_files(service, tmp_path, monkeypatch):
    import os
    import time

    from components import export_panel

    monkeypatch.setattr(export_panel, "EXPORT_ROOT", tmp_path)
    stale = tmp_path / "an-old-request"
    (stale / "png").mkdir(parents=True)
    os.utime(stale, (time.time() - 2 * export_panel.EXPORT_MAX_AGE_S,) * 2)
    request_id, _ = run_generation(service, make_scene(160, 96), "Describe the image.", max_new_tokens=2)
    paths = export_panel.export(service, request_id, 0, "report")
    assert not stale.exists() and all(os.path.exists(p) for p in paths)
    assert build_app(service).delete_cache == (600, 3600)  # Gradio's copies of uploads and shown files


def test_views_never_show_an_earlier_requests_results_as_current(service):
    page = build_app(service)
    handlers = {f.name: f.fn for f in page.fns.values()}
    state, answer, *_ = handlers["on_generate"](make_scene(160, 96), "Describe the image.", "random:llava", 4, 0, 1,
                                                progress=lambda *a, **k: None)
    # a new answer: the status names its word and prompt; the last answer's reverse view, exports and analyses go
    status, reverse, files, summary, drops, box = handlers["on_new_answer"](state)
    trace = service.trace(state["request_id"])
    assert trace.answer_texts[0].strip() in status and "Describe the image." in status
    assert (reverse, files, summary, drops, box) == (None, None, "", None, "")
    # an edited prompt or another image (uploaded or an example) marks the views stale; the inputs they answer
    # clear the mark
    on_inputs_changed = handlers["on_inputs_changed"]
    shown = make_scene(160, 96)
    assert "The prompt changed" in on_inputs_changed(state, "What colour is the square?", shown)
    assert "The image changed" in on_inputs_changed(state, "Describe the image.", make_scene(120, 120))
    assert "The prompt and the image changed" in on_inputs_changed(state, "Is it red?", make_scene(120, 120))
    assert "changed" not in on_inputs_changed(state, "Describe the image.", shown)


def test_the_analyses_show_only_the_settings_their_token_set_reads():
    from components.analysis_panel import selection_controls

    visible = {name: [control.visible for control in selection_controls(name)]
               for name in ("object (box)", "high-norm tokens (register-like)", "random k", "top k of a method")}
    # box, buffer, k, seed, method
    assert visible == {"object (box)": [True, True, False, False, False],
                       "high-norm tokens (register-like)": [False, False, False, False, False],
                       "random k": [False, False, True, True, False],
                       "top k of a method": [False, False, True, False, True]}


def test_logit_lens_names_each_patch_word_and_follows_the_arrow_keys(service):
    from components.analysis_panel import LENS_TOP_K, lens_figure

    image = make_scene(160, 96)
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=3)
    figure = lens_figure(service, {"request_id": request_id, "image": image, "token": 0}, 1)
    heatmap = figure.data[0]
    lens = service.logit_lens(request_id, LENS_TOP_K)
    assert heatmap.texttemplate == "%{text}" and heatmap.text.shape == (lens.rows, lens.cols)
    assert all(word.strip() for word in heatmap.text.ravel())  # blank tokens shown by their repr, never empty
    page = build_app(service)
    slider = next(block for block in page.blocks.values() if getattr(block, "elem_id", None) == "analysis-lens-layer")
    triggers = [(target_id, event) for dependency in page.config["dependencies"]
                for target_id, event in dependency["targets"] if target_id == slider._id]
    assert (slider._id, "change") in triggers  # not "release" alone: keyboard moves redraw the lens


def test_the_gallery_renders_only_while_its_tab_is_open(service):
    import gradio as gr

    page = build_app(service)
    handlers = {f.name: f.fn for f in page.fns.values()}
    state, *outputs = handlers["on_generate"](make_scene(160, 96), "Describe the image.", "random:llava", 3, 0, 1,
                                              "tam", None, "default", "all", True, False, progress=lambda *a, **k: None)
    assert outputs[-1] == gr.skip()  # a closed gallery is left as it is: the click does not render every method
    select = gr.SelectData(None, {"index": 1, "value": None, "selected": True})
    state, *outputs = handlers["on_select"](state, "all", "all", "mean", 0, "tam", None, "default", "all", True, False,
                                            select)
    assert outputs[-1] == gr.skip()
    opened, tiles = handlers["on_gallery_opened"](state, "all", "all", "mean", 0, "default", "all", True)
    assert opened is True and len(tiles) == 8  # opening it renders the selected token's maps, every method
