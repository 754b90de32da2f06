"""Adapters find every image's tokens and grid from the processor's own outputs, for each family."""

from types import SimpleNamespace

import pytest

from lvlm_interpret.capture import build_inputs
from lvlm_interpret.families.llava import processed_box
from tests.conftest import make_scene


def _image_positions(inputs, model):
    return (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten().tolist()


def test_llava_span_and_centre_crop_box(llava):
    image = make_scene(200, 100)
    inputs = build_inputs(llava, [image], "Describe the image.")
    (layout,) = llava.family.image_layouts(llava.model, llava.processor, inputs, [image])
    crop, patch = 64, 8  # configs/random-llava.json
    assert (layout.rows, layout.cols) == (crop // patch, crop // patch)
    assert layout.positions.ravel().tolist() == _image_positions(inputs, llava.model)
    # shortest-edge resize then centre crop keeps the central 100x100 square of a 200x100 image
    assert layout.box == pytest.approx((50.0, 0.0, 150.0, 100.0))
    assert layout.image_size == (200, 100)


def test_llava_pad_to_square_box_extends_beyond_image():
    processor = SimpleNamespace(do_pad=True, do_center_crop=True, do_resize=True, size={"shortest_edge": 336},
                                crop_size={"height": 336, "width": 336})
    assert processed_box(200, 100, processor) == pytest.approx((0.0, -50.0, 200.0, 150.0))


@pytest.mark.parametrize("size", [(200, 90), (90, 200), (150, 150)])
def test_qwen2_vl_grid_follows_image_grid_thw(qwen2_vl, size):
    image = make_scene(*size)
    inputs = build_inputs(qwen2_vl, [image], "What color is the circle?")
    (layout,) = qwen2_vl.family.image_layouts(qwen2_vl.model, qwen2_vl.processor, inputs, [image])
    _, height, width = inputs["image_grid_thw"][0].tolist()
    assert (layout.rows, layout.cols) == (height // 2, width // 2)
    assert layout.positions.ravel().tolist() == _image_positions(inputs, qwen2_vl.model)
    assert layout.box == (0.0, 0.0, float(size[0]), float(size[1]))
    # the grid keeps the image's orientation
    if size[0] > size[1]:
        assert layout.cols > layout.rows
    elif size[0] < size[1]:
        assert layout.rows > layout.cols


def test_qwen2_vl_two_images_get_two_disjoint_spans_in_order(qwen2_vl):
    images = [make_scene(200, 90), make_scene(90, 120)]
    inputs = build_inputs(qwen2_vl, images, "Describe the images.")
    first, second = qwen2_vl.family.image_layouts(qwen2_vl.model, qwen2_vl.processor, inputs, images)
    assert first.positions.max() < second.positions.min()
    assert first.n_cells + second.n_cells == len(_image_positions(inputs, qwen2_vl.model))
    assert (first.rows > first.cols) != (second.rows > second.cols)


def test_module_handles_point_at_the_language_model(llava, qwen2_vl):
    for loaded in (llava, qwen2_vl):
        config = loaded.model.config.get_text_config()
        assert len(loaded.family.language_attentions(loaded.model)) == config.num_hidden_layers
        assert loaded.family.lm_head(loaded.model).weight.shape[0] == config.vocab_size
        assert len(loaded.family.vision_layers(loaded.model)) >= 1
