"""Qwen2.5-VL, Qwen3-VL, Gemma 3, PaliGemma (1 and 2), Mistral 3 and InternVL: each adapter agrees with its
processor's own outputs, its tiny random model goes through `explain` with every method, and maps land where the
attended tokens are."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lvlm_interpret import GenerationOptions, Trace, generate_with_capture, get_method, load_model
from lvlm_interpret.capture import CAPTURE_ATTENTION, build_inputs, replay_inputs
from lvlm_interpret.cli import main
from lvlm_interpret.errors import UserInputError
from lvlm_interpret.families import FAMILIES as REGISTRY
from lvlm_interpret.models.loading import CONFIGS_DIR, DTYPES
from lvlm_interpret.rendering import map_on_image
from tests.conftest import make_scene
from tests.references import eager_replay, reference_lm_map
from tests.test_vision_relevancy import check_vision_tokens

SINGLE_GRID = ["qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma", "mistral3"]  # one grid per image
FAMILIES = SINGLE_GRID + ["internvl"]
# PaliGemma 2 (Gemma 2 decoder): soft-capped attention logits, which capture computes without SDPA
PRESETS = FAMILIES + ["paligemma2"]
PROMPT = "What color is the circle?"


@pytest.fixture(scope="module")
def traces(models):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = generate_with_capture(models(name), [make_scene(200, 90)], PROMPT,
                                                GenerationOptions(max_new_tokens=4, min_new_tokens=4))
        return cache[name]
    return get


def _processor_grids(loaded, inputs) -> list[tuple[int, int]]:
    """Each image's (rows, cols) as the processor itself states it."""
    if "image_grid_thw" in inputs:
        merge = loaded.processor.image_processor.merge_size
        return [(h // merge, w // merge) for _, h, w in inputs["image_grid_thw"].tolist()]
    if "image_sizes" in inputs:  # mistral3: the resized image in merged patches
        step = loaded.processor.patch_size * loaded.processor.spatial_merge_size
        return [(h // step, w // step) for h, w in inputs["image_sizes"].tolist()]
    side = math.isqrt(loaded.processor.image_seq_length)  # gemma3, paligemma: a fixed square of tokens
    return [(side, side)] * inputs["pixel_values"].shape[0]


def _image_token_positions(loaded, inputs) -> list[int]:
    return (inputs["input_ids"][0] == loaded.model.config.image_token_id).nonzero().flatten().tolist()


@pytest.mark.parametrize("family", SINGLE_GRID)
@pytest.mark.parametrize("size", [(200, 90), (90, 200)])
def test_spans_and_grids_equal_the_processors(models, family, size):
    _check_single_grid_layout(models(family), family, size)


def _check_single_grid_layout(loaded, family, size):
    image = make_scene(*size)
    inputs = build_inputs(loaded, [image], PROMPT)
    (layout,) = loaded.family.image_layouts(loaded.model, loaded.processor, inputs, [image])
    ((rows, cols),) = _processor_grids(loaded, inputs)
    assert (layout.rows, layout.cols) == (rows, cols)
    assert layout.positions.reshape(-1).tolist() == _image_token_positions(loaded, inputs)
    # these processors resize the whole image (no crop, no pad): the grid covers all of it
    assert layout.box == (0.0, 0.0, float(size[0]), float(size[1]))
    assert layout.image_size == size
    # the tokens between grid rows (mistral3's [IMG_BREAK] / [IMG_END]) are the image's separators
    tokenizer = loaded.processor.tokenizer
    separators = [tokenizer.convert_tokens_to_ids(t) for t in ("[IMG_BREAK]", "[IMG_END]")] \
        if family == "mistral3" else []
    assert layout.separators.tolist() == np.flatnonzero(np.isin(inputs["input_ids"][0], separators)).tolist()
    if family == "mistral3":
        assert len(layout.separators) == rows and (np.diff(layout.positions[:, 0]) == cols + 1).all()


# The released checkpoints' image geometry (patch, merge, windows, resize limits, tiles) on narrow random models
REAL_GEOMETRY = {
    "qwen2_5_vl": {"image": {"patch": 14, "merge": 2, "min_cells": 4, "max_cells": 16384}},  # 3136 .. 12845056 px
    "qwen3_vl": {"image": {"patch": 16, "merge": 2, "min_cells": 64, "max_cells": 16384}},
    "gemma3": {"image": {"size": 896, "patch": 14, "tokens_per_side": 16}},
    "paligemma": {"image": {"size": 448, "patch": 14}},  # the -448 checkpoints; -224 has 16 x 16 tokens
    "mistral3": {"image": {"longest_edge": 1540, "patch": 14, "merge": 2}},
    "internvl": {"image": {"tile": 448, "patch": 14, "max_tiles": 12}},
}


def _narrow_model_at_real_geometry(family):
    preset = json.loads((CONFIGS_DIR / f"random-{family}.json").read_text())
    preset["image"] = REAL_GEOMETRY[family]["image"]
    preset["text_config"]["max_position_embeddings"] = 16384
    preset["vision_config"]["depth" if "depth" in preset["vision_config"] else "num_hidden_layers"] = 2
    model, processor = REGISTRY[family].build_random(preset)
    return SimpleNamespace(model=model, processor=processor, family=REGISTRY[family])


@pytest.mark.parametrize("family", SINGLE_GRID)
@pytest.mark.parametrize("size", [(1000, 667), (480, 1200)])
def test_layouts_at_the_real_checkpoints_geometry(family, size):
    _check_single_grid_layout(_narrow_model_at_real_geometry(family), family, size)


@pytest.mark.parametrize("size, tiles", [((1000, 667), (2, 3)), ((480, 1200), (5, 2))])
def test_internvl_tiles_at_the_real_checkpoints_geometry(size, tiles):
    loaded = _narrow_model_at_real_geometry("internvl")
    inputs, layout = _internvl_layout(loaded, make_scene(*size))
    assert loaded.processor.image_seq_length == 256 and inputs["pixel_values"].shape[0] == tiles[0] * tiles[1] + 1
    assert (layout.rows, layout.cols) == (tiles[0] * 16, tiles[1] * 16)
    assert layout.cell_positions.tolist() == _image_token_positions(loaded, inputs)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "internvl"])
def test_vision_tokens_at_the_real_checkpoints_geometry(family):
    """Qwen2.5-VL's 112-pixel windows over 14-pixel patches; Gemma 3's 64 x 64 patches pooled to 16 x 16; InternVL's
    448-pixel tiles of 32 x 32 patches, pixel-shuffled, with a thumbnail."""
    check_vision_tokens(_narrow_model_at_real_geometry(family), [make_scene(300, 200)], cells_per_image=40)


@pytest.mark.parametrize("family", SINGLE_GRID)
def test_two_images_get_their_own_spans_in_order(models, family):
    loaded = models(family)
    images = [make_scene(200, 90), make_scene(90, 120)]
    inputs = build_inputs(loaded, images, "Describe the images.")
    layouts = loaded.family.image_layouts(loaded.model, loaded.processor, inputs, images)
    assert [(layout.rows, layout.cols) for layout in layouts] == _processor_grids(loaded, inputs)
    assert np.concatenate([layout.positions.reshape(-1) for layout in layouts]).tolist() == \
        _image_token_positions(loaded, inputs)
    assert layouts[0].positions.max() < layouts[1].positions.min()
    assert [layout.image_size for layout in layouts] == [(200, 90), (90, 120)]


@pytest.mark.parametrize("family", FAMILIES)
def test_map_mass_lands_where_the_attended_token_is(traces, family):
    trace = traces(family)
    layout = trace.images[0]
    width, height = layout.image_size
    positions = layout.positions.reshape(-1)
    for position, (x_range, y_range) in [
        (positions[0], ((0, width / layout.cols), (0, height / layout.rows))),  # first token: top-left cell
        (positions[-1], ((width - width / layout.cols, width), (height - height / layout.rows, height))),
    ]:
        attention = torch.zeros_like(trace.attention)
        attention[0, :, :, position] = 1.0
        hand_set = dataclasses.replace(trace, attention=attention)
        on_image = map_on_image(get_method("attention").explain(hand_set, 0).maps[0], layout)
        ys, xs = np.nonzero(on_image)
        assert on_image.sum() > 0
        assert x_range[0] - 1 <= xs.min() and xs.max() <= x_range[1] + 1, (family, position)
        assert y_range[0] - 1 <= ys.min() and ys.max() <= y_range[1] + 1, (family, position)


@pytest.mark.parametrize("family", FAMILIES)
def test_explain_runs_every_method(tmp_path, family):
    image_path = tmp_path / "scene.png"
    make_scene(120, 60).save(image_path)
    out = tmp_path / "run"
    assert main(["explain", "--model", f"random:{family}", "--image", str(image_path), "--prompt", PROMPT,
                 "--max-new-tokens", "2", "--methods", "all", "--tokens", "0", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["methods"] == ["attention", "cleann", "igos", "relevancy", "tam"]
    grid = result["image"]["grid"]
    maps = np.load(out / "maps.npz")
    vision = {"relevancy_vit", "relevancy_all"}
    assert set(maps.keys()) == {"attention", "cleann", "igos", "igos_answer", "relevancy", "tam", "tam_raw",
                                 "tam_cleaned"} | vision
    for name, values in maps.items():
        assert values.shape == (1, *grid) and (values >= 0).all(), name
    for name in {"attention", "relevancy"} | vision:
        assert maps[name].any(), name  # the LM and the vision tower are both reached
    assert "0" in result["cleann"]


@pytest.mark.parametrize("family", PRESETS)
def test_captured_rows_and_relevancy_match_eager_references(models, traces, family):
    loaded, trace = models(family), traces(family)
    output = eager_replay(loaded, trace)
    lm_attentions = output.attentions[-loaded.model.config.get_text_config().num_hidden_layers:]
    for t in range(trace.n_answer):
        source = trace.source_position(t)
        for layer, attentions in enumerate(lm_attentions):
            expected = attentions[0, :, source, : source + 1]
            assert torch.allclose(trace.attention[t, layer, :, : source + 1].float(), expected, atol=2e-3)
    logprobs = torch.log_softmax(output.logits[0].float(), -1)
    for t in range(trace.n_answer):
        assert logprobs[trace.source_position(t), trace.answer_ids[t]] == pytest.approx(
            float(trace.answer_logprobs[t]), abs=1e-3)
    t = trace.n_answer - 1
    expected_map, logit = reference_lm_map(loaded, trace, t)
    explanation = get_method("relevancy").explain(trace, t, model=loaded)
    np.testing.assert_allclose(explanation.maps[0], expected_map, rtol=1e-3, atol=1e-6)
    assert explanation.details["target_logit"] == pytest.approx(logit, abs=1e-4)


@pytest.mark.parametrize("preset", ["paligemma", "paligemma2"])
def test_paligemma_prefix_is_bidirectional_and_the_answer_causal_in_replays(models, traces, preset, tmp_path):
    loaded, trace = models(preset), traces(preset)
    token_types = [[0] * trace.prompt_length + [1] * trace.n_answer]
    assert trace.model_inputs["token_type_ids"].tolist() == token_types
    # a saved trace keeps them; a replay on re-processed inputs (the blurred image of LLR) extends them the same way
    trace.save(tmp_path / "trace.safetensors")
    assert Trace.load(tmp_path / "trace.safetensors").model_inputs["token_type_ids"].tolist() == token_types
    reprocessed = {name: value for name, value in build_inputs(loaded, [make_scene(200, 90)], PROMPT).items()
                   if name not in ("input_ids", "attention_mask")}
    assert replay_inputs(trace, model_inputs=reprocessed)["token_type_ids"].tolist() == token_types
    attentions = eager_replay(loaded, trace).attentions[-1][0]  # last LM layer [heads, S, S]
    first_image = int(trace.images[0].positions[0, 0])
    # an image token (first in the sequence) sees the last prompt token, but no answer token
    assert attentions[:, first_image, trace.prompt_length - 1].min() > 0
    assert not attentions[:, first_image, trace.prompt_length:].any()
    # answer tokens see nothing after themselves
    for position in range(trace.prompt_length, trace.input_ids.shape[0] - 1):
        assert not attentions[:, position, position + 1:].any()


def _internvl_layout(loaded, image):
    inputs = build_inputs(loaded, [image], PROMPT)
    (layout,) = loaded.family.image_layouts(loaded.model, loaded.processor, inputs, [image])
    return inputs, layout


@pytest.mark.parametrize("size, tiles", [((200, 90), (1, 2)), ((90, 200), (2, 1)), ((60, 60), (2, 2)),
                                         ((30, 30), (1, 1))])
def test_internvl_tiles_are_stitched_in_the_processors_arrangement(models, size, tiles):
    loaded = models("internvl")
    inputs, layout = _internvl_layout(loaded, make_scene(*size))
    side = math.isqrt(loaded.processor.image_seq_length)
    n_tiles = tiles[0] * tiles[1]
    n_crops = n_tiles + (n_tiles > 1)  # the thumbnail comes last when there are several tiles
    assert inputs["pixel_values"].shape[0] == n_crops
    assert (layout.rows, layout.cols) == (tiles[0] * side, tiles[1] * side)
    assert [view.name for view in layout.views] == (["tiles", "thumbnail"] if n_tiles > 1 else ["tiles"])
    assert layout.cell_positions.tolist() == _image_token_positions(loaded, inputs)
    ids = inputs["input_ids"][0]
    assert ids[layout.separators].tolist() == loaded.processor.tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
    assert layout.box == (0.0, 0.0, float(size[0]), float(size[1]))


def test_internvl_tile_tokens_land_on_the_part_of_the_image_the_tile_was_cut_from(models):
    loaded = models("internvl")
    image = make_scene(200, 90)
    image.paste((255, 0, 0), (100, 0, 200, 90))  # the right half is red
    trace = generate_with_capture(loaded, [image], PROMPT, GenerationOptions(max_new_tokens=2))
    pixels = trace.model_inputs["pixel_values"]  # [crops, 3, tile, tile], normalised
    redness = (pixels[:, 0] - pixels[:, 1]).mean((1, 2))
    red_tile = int(redness[:2].argmax())  # of the two tiles (the thumbnail is the last crop)
    per_tile = loaded.processor.image_seq_length
    # the model scatters crop k's features into the k-th block of image tokens
    block = _image_token_positions(loaded, {"input_ids": trace.input_ids[None]})[
        red_tile * per_tile:(red_tile + 1) * per_tile]
    attention = torch.zeros_like(trace.attention)
    attention[0, :, :, block] = 1.0
    hand_set = dataclasses.replace(trace, attention=attention)
    on_image = map_on_image(get_method("attention").explain(hand_set, 0).maps[0], trace.images[0])
    assert on_image[:, 100:].sum() > 0 and on_image[:, :100].sum() == 0
    # the thumbnail's tokens are their own view, not cells of the stitched map
    attention = torch.zeros_like(trace.attention)
    attention[0, :, :, trace.images[0].view("thumbnail").positions.reshape(-1)] = 1.0
    assert not get_method("attention").explain(dataclasses.replace(trace, attention=attention), 0).maps[0].any()


def test_internvl_two_images(models):
    loaded = models("internvl")
    images = [make_scene(200, 90), make_scene(90, 200)]
    inputs = build_inputs(loaded, images, "Describe the images.")
    first, second = loaded.family.image_layouts(loaded.model, loaded.processor, inputs, images)
    assert first.cols > first.rows and second.rows > second.cols
    assert first.token_positions.max() < second.token_positions.min()
    assert np.concatenate([first.cell_positions, second.cell_positions]).tolist() == \
        _image_token_positions(loaded, inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_the_real_architecture_and_checkpoint_presets_are_loadable_names(models, family):
    loaded = models(family)
    assert loaded.model.config.model_type in REGISTRY[family].model_types
    preset = json.loads((CONFIGS_DIR / "checkpoints" / f"{family}.json").read_text())
    assert preset["family"] == family and preset["checkpoints"]
    for checkpoint in preset["checkpoints"]:
        assert checkpoint["id"].count("/") == 1 and checkpoint["dtype"] in DTYPES
        assert checkpoint["attn_implementation"] == CAPTURE_ATTENTION


@pytest.mark.parametrize("family", FAMILIES + ["qwen2_vl"])  # qwen2_vl: its processor loading is shared
def test_a_saved_checkpoint_folder_loads_through_the_familys_processor(models, traces, tmp_path, family):
    """What loading a real checkpoint does (AutoModel + the family's processor, no torchvision), offline."""
    loaded = models(family)
    loaded.model.save_pretrained(tmp_path)
    loaded.processor.save_pretrained(tmp_path)
    if family == "paligemma":  # released PaliGemma processors have no chat template: the family supplies one
        (tmp_path / "chat_template.jinja").unlink()
    reloaded = load_model(str(tmp_path), device="cpu")
    assert reloaded.family.name == family
    trace = generate_with_capture(reloaded, [make_scene(200, 90)], PROMPT,
                                  GenerationOptions(max_new_tokens=4, min_new_tokens=4))
    assert trace.answer_ids == traces(family).answer_ids
    assert [layout.to_json() for layout in trace.images] == [layout.to_json() for layout in traces(family).images]


def test_gemma3_pan_and_scan_crops_get_one_clear_message():
    loaded = load_model("random:gemma3", device="cpu")  # its own copy: the processor is changed
    loaded.processor.images_kwargs = {**loaded.processor.images_kwargs, "do_pan_and_scan": True,
                                      "pan_and_scan_min_crop_size": 32}
    with pytest.raises(UserInputError, match="pan-and-scan crops are not supported"):
        generate_with_capture(loaded, [make_scene(400, 90)], PROMPT, GenerationOptions(max_new_tokens=1))


@pytest.mark.parametrize("family", FAMILIES)
def test_module_handles_line_up_with_the_models_layers(models, family):
    """Hook points and relevancy index the towers' layers and their attention modules together."""
    loaded = models(family)
    adapter, model = loaded.family, loaded.model
    text = model.config.get_text_config()
    assert len(adapter.language_attentions(model)) == len(adapter.language_layers(model)) == text.num_hidden_layers
    assert adapter.lm_head(model).weight.shape[0] == text.vocab_size
    layers, attentions = adapter.vision_layers(model), adapter.vision_attentions(model)
    assert len(layers) == len(attentions) >= 1
    assert all(attention in set(layer.modules()) for layer, attention in zip(layers, attentions))
