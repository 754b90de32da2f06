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
    request_id, trace = run_generation(service, image, "Describe the image.", 5)
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
        run_generation(service, None, "Describe the image.", 5)


def test_app_builds(service):
    assert build_app(service) is not None


def test_method_panel_shows_each_registered_method(service):
    from components.method_panel import method_names, render_method

    image = make_scene(160, 96)
    request_id, trace = run_generation(service, image, "Describe the image.", 4)
    assert {"relevancy", "tam", "cleann"} <= set(method_names())
    picture, names, shown, _ = render_method(service, request_id, image, 1, "tam", "tam_raw")
    assert shown == "tam_raw" and set(names) == {"tam", "tam_raw", "tam_cleaned"}
    expected = blend(image, overlay(get_method("tam").explain(trace, 1, model=service.model()).variants["raw"][0],
                                    trace.images[0]))
    assert np.array_equal(np.asarray(picture), np.asarray(expected))
    _, names, shown, summary = render_method(service, request_id, image, 1, "cleann")
    assert shown == "cleann" and "p(token)" in summary
