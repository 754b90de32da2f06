"""The web page's handlers: generate, then a clicked token's overlay."""

import numpy as np
import pytest
from PIL import Image

from app import build_app
from components import token_strip
from components.attention_panel import render_attention
from components.generation import run_generation
from lvlm_interpret import ExplainService, UserInputError, get_method
from lvlm_interpret.rendering import blend, overlay
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
        assert isinstance(picture, Image.Image) and picture.size == image.size
        expected = blend(image, overlay(get_method("attention").explain(trace, t).maps[0], trace.images[0]))
        assert np.array_equal(np.asarray(picture), np.asarray(expected))
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
    from components.comparison_panel import TILE, render_comparison

    image = make_scene(320, 192)
    request_id, _ = run_generation(service, image, "Describe the image.", max_new_tokens=3)
    tiles = render_comparison(service, request_id, image, 1)
    names = [name for _, name in tiles]
    assert {"attention", "relevancy", "relevancy_vit", "relevancy_all", "tam", "tam_raw", "tam_cleaned",
            "cleann"} == set(names)
    assert len({picture.size for picture, _ in tiles}) == 1 and max(tiles[0][0].size) == TILE


def test_exports(service):
    import json

    from components.export_panel import export

    image = make_scene(160, 96)
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=3)
    pngs = export(service, request_id, 2, "png")
    assert any(p.endswith("tam_raw_token2.png") for p in pngs) and all(Image.open(p).size == image.size for p in pngs)
    result_path, maps_path = export(service, request_id, 2, "request")
    result = json.loads(open(result_path).read())
    assert len(result["tokens"]) == trace.n_answer and set(result["cleann"]) == {"2"}
    assert np.load(maps_path)["relevancy"].shape == (trace.n_answer, 8, 8)
    (report,) = export(service, request_id, 2, "report")
    text = open(report).read()
    assert text.count("data:image/png;base64,") == 8 and "http" not in text.replace("http-equiv", "")
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
    assert shown == "tam_raw" and set(names) == {"tam", "tam_raw", "tam_cleaned"}
    expected = blend(image, overlay(get_method("tam").explain(trace, 1, model=service.model()).variants["raw"][0],
                                    trace.images[0]))
    assert np.array_equal(np.asarray(picture), np.asarray(expected))
    _, names, shown, summary, _, graph = render_method(service, request_id, image, 1, "cleann")
    assert shown == "cleann" and "p(token)" in summary
    details = service.explain(request_id, "cleann", 1).details
    assert len(graph.data[1].x) == len(details["nodes"])  # every node drawn (one image)
    assert sum(x is None for x in graph.data[0].x) == len(details["edges"])  # every edge drawn


def test_the_methods_own_controls_in_the_panel_reach_the_methods(service):
    from components.method_panel import method_controls, panel_options, render_method

    image = make_scene(160, 96)
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=4)
    layer, head, vision = method_controls(trace, "cleann", "0", "1", True)
    assert layer.choices[0][0] == "last" and len(layer.choices) == trace.n_layers + 1
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
    assert names == ["relevancy"]
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
    from components.attention_panel import OVERVIEW_CELL_PX, overview_selection, render_views, reverse_view
    from lvlm_interpret.methods.attention import attention_overview, reverse_attention

    image = make_scene(160, 96)
    request_id, trace = run_generation(service, image, "Describe the image.", max_new_tokens=4)
    picture, figure, overview = render_views(service, request_id, image, 1)
    assert overview.size == (trace.n_heads * OVERVIEW_CELL_PX, trace.n_layers * OVERVIEW_CELL_PX)
    assert figure.data[0].z.shape == (8, 8)  # the interactive heatmap holds the token's grid
    assert overview_selection(OVERVIEW_CELL_PX * 3 + 5, OVERVIEW_CELL_PX * 2 + 1, trace.n_layers,
                              trace.n_heads) == ("2", "3")
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
    assert model_choices("random:llava", ["random:llava"]) == ["random:llava"]
    assert "random:qwen2_vl" in model_choices("demo")


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
