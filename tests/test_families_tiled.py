"""Layouts with several grids per image (tiled families) and the families that make them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from lvlm_interpret import GenerationOptions, generate_with_capture, get_method, load_model
from lvlm_interpret.capture import CAPTURE_ATTENTION, build_inputs
from lvlm_interpret.cli import main
from lvlm_interpret.errors import UserInputError
from lvlm_interpret.families import FAMILIES
from lvlm_interpret.families.base import ImageLayout, ImageView
from lvlm_interpret.families.llava_next import stitched_grid
from lvlm_interpret.methods.attention import attention_scores
from lvlm_interpret.models.loading import CONFIGS_DIR, DTYPES
from lvlm_interpret.rendering import map_on_image
from lvlm_interpret.trace import Trace
from tests.conftest import make_scene
from tests.test_vision_relevancy import check_vision_tokens


def _tiled_layout() -> ImageLayout:
    """A 2x2 base grid at positions 10..13, then a 2x4 stitched grid written row by row with a newline token
    after each row (positions 14..17, 18 newline, 19..22, 23 newline)."""
    base = ImageView("base", np.arange(10, 14).reshape(2, 2), (0.0, 0.0, 80.0, 40.0))
    tiles = ImageView("tiles", np.array([[14, 15, 16, 17], [19, 20, 21, 22]]), (0.0, 0.0, 80.0, 40.0))
    return ImageLayout(views=(tiles, base), image_size=(80, 40), separators=np.array([18, 23]))


def test_gather_reads_the_maps_grid_and_other_views_by_name():
    layout = _tiled_layout()
    values = np.arange(30, dtype=np.float64)
    assert layout.gather(values).tolist() == [[14, 15, 16, 17], [19, 20, 21, 22]]
    assert layout.gather(values).dtype == np.float32
    assert layout.gather(values, view="base").tolist() == [[10, 11], [12, 13]]
    assert layout.gather(np.stack([values, -values]))[1, 0, 0] == -14  # leading axes are kept
    assert (layout.rows, layout.cols, layout.n_cells, layout.box) == (2, 4, 8, (0.0, 0.0, 80.0, 40.0))
    assert layout.cell_positions.tolist() == [10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22]
    assert layout.token_positions.tolist() == list(range(10, 24))
    assert layout.cell_of(20) == (1, 1) and layout.cell_of(18) is None and layout.cell_of(11) is None
    with pytest.raises(UserInputError, match="no 'global' view; its views are tiles, base"):
        layout.gather(values, view="global")


def test_layout_json_round_trip_and_traces_saved_before_views():
    layout = _tiled_layout()
    data = layout.to_json()
    assert data["views"][0]["runs"] == [[14, 4], [19, 4]] and data["separators"] == [[18, 1], [23, 1]]
    assert ImageLayout.from_json(data) == layout
    old = {"start": 5, "rows": 2, "cols": 3, "box": [0, 0, 30, 20], "image_size": [30, 20]}
    loaded = ImageLayout.from_json(old)
    assert loaded == ImageLayout.contiguous(5, 2, 3, (0, 0, 30, 20), (30, 20))
    assert loaded.positions.tolist() == [[5, 6, 7], [8, 9, 10]] and loaded.views[0].name == "image"
    with pytest.raises(UserInputError, match="neither 'views' nor 'start'"):
        ImageLayout.from_json({"rows": 2})


# --- LLaVA-NeXT and LLaVA-OneVision ------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llava_next", "llava_onevision", "llava_onevision-siglip"])
def anyres_model(request):
    return load_model(f"random:{request.param}", device="cpu")


def _packed_tags(loaded, inputs) -> np.ndarray:
    """[positions, 2]: for every image token, (tile, cell) of the vision feature the model's own packing puts there
    (tile 0 is the base image, cell is row-major within the tile, (-1, -1) is image_newline); (-2, -2) elsewhere.
    Where OneVision shrinks the stitched grid the tags are blends."""
    model = loaded.model.model
    n_tiles = inputs["pixel_values"].shape[1]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    tags = torch.zeros(n_tiles, side * side, model.config.text_config.hidden_size)
    tags[..., 0] = torch.arange(n_tiles)[:, None]
    tags[..., 1] = torch.arange(side * side)[None, :]
    newline = torch.full((model.config.text_config.hidden_size,), -1.0)
    options = {"vision_aspect_ratio": model.config.vision_aspect_ratio} \
        if loaded.family.name == "llava_onevision" else {"vision_feature_select_strategy": "default"}
    (packed,), _ = model.pack_image_features([tags], inputs["image_sizes"], image_newline=newline, **options)
    result = np.full((inputs["input_ids"].shape[1], 2), -2.0)
    result[(inputs["input_ids"][0] == model.config.image_token_id).numpy()] = packed[:, :2].numpy()
    return result


def _check_anyres_layout(loaded, size) -> bool:
    """Check an image's layout against the processor's tokens and the model's own packing; whether the model shrank
    the stitched grid (OneVision)."""
    config = loaded.model.config
    tile_px = config.vision_config.image_size
    side = tile_px // config.vision_config.patch_size
    image = make_scene(*size)
    inputs = build_inputs(loaded, [image], "Describe the image.")
    (layout,) = loaded.family.image_layouts(loaded.model, loaded.processor, inputs, [image])
    assert layout.image_size == size and [v.name for v in layout.views] == ["tiles", "base"]
    image_tokens = (inputs["input_ids"][0] == config.image_token_id).nonzero().flatten()
    assert layout.token_positions.tolist() == image_tokens.tolist()  # every image token, nothing else
    tags = _packed_tags(loaded, inputs)
    base = layout.view("base")
    assert (tags[base.positions, 0] == 0).all()
    assert tags[base.positions, 1].tolist() == np.arange(side * side).reshape(side, side).tolist()
    assert (tags[layout.separators] == -1).all() and len(layout.separators) == layout.rows
    n_tiles_high, n_tiles_wide = get_anyres_image_grid_shape(inputs["image_sizes"][0].tolist(),
                                                             config.image_grid_pinpoints, tile_px)
    assert inputs["pixel_values"].shape[1] == 1 + n_tiles_high * n_tiles_wide
    unshrunk = stitched_grid(size[1], size[0], config.image_grid_pinpoints, tile_px, side)
    shrunk = (layout.rows, layout.cols) != (unshrunk.rows, unshrunk.cols)
    if not shrunk:
        # stitched cell (r, c) holds tile (r // side, c // side)'s cell, shifted by the rows / cols unpadding cut
        tile, cell = tags[layout.positions, 0].astype(int) - 1, tags[layout.positions, 1].astype(int)
        global_row = tile // n_tiles_wide * side + cell // side
        global_col = tile % n_tiles_wide * side + cell % side
        assert (global_row - np.arange(layout.rows)[:, None] == global_row[0, 0]).all()
        assert (global_col - np.arange(layout.cols)[None, :] == global_col[0, 0]).all()
    # the grid covers the image up to the unpadding's rounding: less than one unshrunk cell off on each side,
    # centred as the processor pads (up to two canvas pixels)
    x0, y0, x1, y1 = layout.box
    pixel_w, pixel_h = size[0] / (n_tiles_wide * tile_px), size[1] / (n_tiles_high * tile_px)
    cell_w, cell_h = pixel_w * tile_px / side * 1.5, pixel_h * tile_px / side * 1.5
    assert abs(y0) < cell_h and abs(y1 - size[1]) < cell_h and abs(x0) < cell_w and abs(x1 - size[0]) < cell_w
    assert abs(y0 + y1 - size[1]) < max(1, 2 * pixel_h) and abs(x0 + x1 - size[0]) < max(1, 2 * pixel_w)
    assert (layout.rows > layout.cols) == (size[1] > size[0]) or size[0] == size[1]
    return shrunk


@pytest.mark.parametrize("size", [(100, 60), (60, 100), (64, 64), (200, 40), (300, 300)])
def test_anyres_views_match_the_processor_and_the_models_packing(anyres_model, size):
    shrunk = _check_anyres_layout(anyres_model, size)
    assert shrunk == (anyres_model.family.name == "llava_onevision" and size in [(100, 60), (60, 100), (300, 300)])


@pytest.mark.parametrize("family, geometry", [
    # llava-hf/llava-v1.6-*: CLIP-L/14 at 336, the processor's default pinpoints
    ("llava_next", {"tile": 336, "patch": 14,
                    "pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]}),
    # llava-hf/llava-onevision-qwen2-*: SigLIP/14 at 384 read whole ("full"), anyres_max_9 over 1x1 .. 6x6 tiles
    ("llava_onevision-siglip", {"tile": 384, "patch": 14, "max_tiles": 9,
                                "pinpoints": [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]}),
])
@pytest.mark.parametrize("size", [(1000, 667), (480, 1200), (640, 640), (1500, 1400)])
def test_anyres_layouts_at_the_real_checkpoints_geometry(family, geometry, size):
    """The real checkpoints' tile, patch and pinpoint geometry on a narrow random model (no weights needed)."""
    preset = json.loads((CONFIGS_DIR / f"random-{family}.json").read_text())
    preset["image"] = {**preset["image"], **geometry}
    preset["text_config"]["max_position_embeddings"] = 16384
    model, processor = FAMILIES[preset["family"]].build_random(preset)
    loaded = SimpleNamespace(model=model, processor=processor, family=FAMILIES[preset["family"]])
    # OneVision shrinks what exceeds 9 tiles' worth of cells: a 1500x1400 image gets 4x4 tiles
    assert _check_anyres_layout(loaded, size) == (family.startswith("llava_onevision") and size == (1500, 1400))
    check_vision_tokens(loaded, [make_scene(*size)], cells_per_image=30)


def _mass_inside(grid_map, layout, box) -> float:
    """The share of the map's mass, placed on the original image, that falls inside `box` (original pixels)."""
    on_image = map_on_image(grid_map, layout)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return float(on_image[max(y0, 0):y1, max(x0, 0):x1].sum() / on_image.sum())


def _attend_only_to(trace, positions):
    """The trace with every answer token's attention, in every layer and head, spread evenly over `positions`."""
    trace.attention.zero_()
    trace.attention[..., positions] = 1.0 / len(positions)
    return trace


@pytest.mark.parametrize("width, height", [(100, 60), (200, 40)])
def test_anyres_attention_on_one_tiles_tokens_lands_on_that_tile(anyres_model, tmp_path, width, height):
    image = make_scene(width, height)
    trace = generate_with_capture(anyres_model, [image], "Describe the image.", GenerationOptions(max_new_tokens=2))
    trace.save(tmp_path / "trace.safetensors")
    assert Trace.load(tmp_path / "trace.safetensors").images == trace.images
    inputs = build_inputs(anyres_model, [image], "Describe the image.")
    tags = _packed_tags(anyres_model, inputs)
    # where the processor put the resized image on the canvas of tiles
    pinpoints = anyres_model.processor.image_processor.image_grid_pinpoints
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    resized_h, resized_w = get_patch_output_size(np.empty((3, height, width)), (best_h, best_w), ChannelDimension.FIRST)
    top, left = (best_h - resized_h) // 2, (best_w - resized_w) // 2
    layout = trace.images[0]
    # every stitched cell comes from one tile (OneVision's shrink of 100x60 blends cells only within tiles)
    assert np.isin(tags[layout.positions, 0], np.arange(1, inputs["pixel_values"].shape[1])).all()
    for tile in range(1, inputs["pixel_values"].shape[1]):
        row, col = divmod(tile - 1, best_w // 32)
        box = ((col * 32 - left) * width / resized_w, (row * 32 - top) * height / resized_h,
               ((col + 1) * 32 - left) * width / resized_w, ((row + 1) * 32 - top) * height / resized_h)
        _attend_only_to(trace, np.flatnonzero(tags[:, 0] == tile).tolist())
        grid_map = get_method("attention").explain(trace, 0).maps[0]
        assert grid_map.sum() == pytest.approx(1.0, abs=1e-3)  # the stitched view holds every tile's cells
        assert _mass_inside(grid_map, layout, box) > 0.99
    # attention on the base image's tokens is not in the stitched map, but in the base view's grid
    _attend_only_to(trace, layout.view("base").positions.ravel().tolist())
    assert get_method("attention").explain(trace, 0).maps[0].sum() == 0
    base_map = layout.gather(attention_scores(trace, 0, "all", "all", "mean"), view="base")
    assert base_map.shape == (4, 4) and base_map.sum() == pytest.approx(1.0, abs=1e-3)


# --- Idefics3 / SmolVLM ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def split_model(request):
    return load_model(f"random:{request.param}", device="cpu")


def _tile_blocks(loaded, inputs) -> dict[tuple[int, int], list[int]]:
    """The image-token positions that follow each <row_i_col_j> tag in input_ids: the processor's tiles."""
    ids = inputs["input_ids"][0].tolist()
    tokens = loaded.processor.tokenizer.convert_ids_to_tokens(ids)
    blocks = {}
    for position, token in enumerate(tokens):
        if token.startswith("<row_"):
            row, col = (int(part) - 1 for part in token[len("<row_"):-1].split("_col_"))
            end = position + 1
            while ids[end] == loaded.model.config.image_token_id:
                end += 1
            blocks[(row, col)] = list(range(position + 1, end))
    return blocks


def _check_split_layout(loaded, size):
    """Check an image's layout against the processor's tiles (its row / col info and <row_i_col_j> tags)."""
    config = loaded.model.config
    side = config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor
    image = make_scene(*size)
    inputs = build_inputs(loaded, [image], "Describe the image.")
    (layout,) = loaded.family.image_layouts(loaded.model, loaded.processor, inputs, [image])
    info = loaded.processor.image_processor(images=[[image]], return_row_col_info=True)
    rows, cols = info["rows"][0][0], info["cols"][0][0]
    assert rows >= 1 and cols >= 1 and inputs["pixel_values"].shape[1] == rows * cols + 1
    assert (rows > cols) == (size[1] > size[0]) or size[0] == size[1]
    assert [v.name for v in layout.views] == ["tiles", "global"]
    assert (layout.rows, layout.cols) == (rows * side, cols * side)
    assert layout.view("global").positions.shape == (side, side)
    blocks = _tile_blocks(loaded, inputs)
    assert set(blocks) == {(r, c) for r in range(rows) for c in range(cols)}
    for (r, c), block in blocks.items():
        assert layout.positions[r * side:(r + 1) * side, c * side:(c + 1) * side].ravel().tolist() == block
    image_tokens = (inputs["input_ids"][0] == config.image_token_id).nonzero().flatten().tolist()
    assert layout.cell_positions.tolist() == image_tokens
    # separators: the tile tags, the global tag, the wrapping tokens and the text between tile rows; one span
    span = layout.token_positions
    assert span.tolist() == list(range(span[0], span[-1] + 1))
    assert len(layout.separators) == len(span) - len(image_tokens) >= rows * cols * 2 + 3
    assert layout.box == (0.0, 0.0, float(size[0]), float(size[1]))  # tiles and global image cover all of it


@pytest.mark.parametrize("size", [(100, 60), (60, 100), (200, 40)])
def test_split_views_match_the_processor(split_model, size):
    _check_split_layout(split_model, size)


@pytest.mark.parametrize("family, geometry", [
    ("idefics3", {"tile": 364, "patch": 14, "scale_factor": 2, "longest_edge": 1456}),  # Idefics3-8B-Llama3
    ("smolvlm", {"tile": 512, "patch": 16, "scale_factor": 4, "longest_edge": 2048}),  # SmolVLM-256M / 500M
])
@pytest.mark.parametrize("size", [(1000, 667), (480, 1200)])
def test_split_layouts_at_the_real_checkpoints_geometry(family, geometry, size):
    """The real checkpoints' tile, patch and shuffle geometry on a narrow random model (no weights needed)."""
    preset = json.loads((CONFIGS_DIR / f"random-{family}.json").read_text())
    preset["image"] = geometry
    preset["text_config"]["max_position_embeddings"] = 16384
    model, processor = FAMILIES[family].build_random(preset)
    loaded = SimpleNamespace(model=model, processor=processor, family=FAMILIES[family])
    _check_split_layout(loaded, size)
    check_vision_tokens(loaded, [make_scene(*size)], cells_per_image=30)


def test_split_tile_tokens_are_the_patch_grid_row_major(split_model):
    """The model's pixel shuffle makes token (r, c) of a tile from patches (2r..2r+1, 2c..2c+1): a row-major grid."""
    connector, config = split_model.model.model.connector, split_model.model.config
    patches = config.vision_config.image_size // config.vision_config.patch_size
    tags = torch.arange(patches * patches, dtype=torch.float32)[None, :, None].repeat(1, 1, 2)
    shuffled = connector.pixel_shuffle(tags, config.scale_factor)[0, :, ::2]  # [tokens, patches merged]
    side = patches // config.scale_factor
    for token in range(side * side):
        r, c = divmod(token, side)
        expected = {(2 * r + a) * patches + 2 * c + b for a in range(2) for b in range(2)}
        assert set(shuffled[token].long().tolist()) == expected


def test_split_attention_on_one_tiles_tokens_lands_on_that_tile(split_model):
    width, height = 100, 60
    image = make_scene(width, height)
    trace = generate_with_capture(split_model, [image], "Describe the image.", GenerationOptions(max_new_tokens=2))
    blocks = _tile_blocks(split_model, build_inputs(split_model, [image], "Describe the image."))
    rows, cols = max(r for r, _ in blocks) + 1, max(c for _, c in blocks) + 1
    for (r, c), block in blocks.items():
        _attend_only_to(trace, block)
        grid_map = get_method("attention").explain(trace, 0).maps[0]
        box = (c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows)
        assert grid_map.sum() == pytest.approx(1.0, abs=1e-3)
        assert _mass_inside(grid_map, trace.images[0], box) > 0.99


# --- every tiled family through `explain` with every method ----------------------------------------------------
@pytest.mark.parametrize("preset", ["llava_next", "llava_onevision", "idefics3", "smolvlm"])
def test_explain_with_every_method(tmp_path, preset):
    path, out = tmp_path / "scene.png", tmp_path / "run"
    make_scene(100, 60).save(path)
    assert main(["explain", "--image", str(path), "--prompt", "Describe the image.", "--model", f"random:{preset}",
                 "--max-new-tokens", "2", "--methods", "all", "--tokens", "1", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["methods"] == ["attention", "cleann", "igos", "relevancy", "tam"]
    image = result["image"]
    assert image["views"][0] == {"name": "tiles", "grid": image["grid"], "box": image["box"]}
    assert image["views"][0]["box"] == ([0.0, -3.103, 100.0, 63.103] if preset.startswith("llava") else [0, 0, 100, 60])
    assert len(image["views"]) == 2
    maps = np.load(out / "maps.npz")
    assert set(maps.keys()) == {"attention", "cleann", "igos", "igos_answer", "relevancy", "relevancy_vit",
                                "relevancy_all", "tam", "tam_raw", "tam_cleaned"}
    for name in maps.keys():
        assert maps[name].shape == (1, *image["grid"]) and (maps[name] >= 0).all() and np.isfinite(maps[name]).all()
    assert all(maps[name].sum() > 0 for name in ("attention", "relevancy", "relevancy_vit", "relevancy_all", "tam_raw"))
    assert set(result["cleann"]) == {"1"}


@pytest.mark.parametrize("preset", ["llava_next", "llava_onevision", "idefics3", "smolvlm"])
def test_two_images_get_their_own_views_in_order(preset):
    loaded = load_model(f"random:{preset}", device="cpu")
    images = [make_scene(100, 60), make_scene(40, 90)]
    inputs = build_inputs(loaded, images, "Describe the images.")
    first, second = loaded.family.image_layouts(loaded.model, loaded.processor, inputs, images)
    assert first.token_positions.max() < second.token_positions.min()
    image_tokens = (inputs["input_ids"][0] == loaded.model.config.image_token_id).nonzero().flatten().tolist()
    assert np.concatenate([first.cell_positions, second.cell_positions]).tolist() == \
        [p for p in image_tokens if p not in set(first.separators) | set(second.separators)]
    assert (first.image_size, second.image_size) == ((100, 60), (40, 90))
    assert first.cols > first.rows and second.rows > second.cols


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "idefics3", "smolvlm"])
def test_checkpoint_presets_name_a_registered_family_and_a_known_dtype(family):
    preset = json.loads((CONFIGS_DIR / "checkpoints" / f"{family}.json").read_text())
    assert preset["family"] == family and family in FAMILIES[family].model_types
    assert preset["checkpoints"] and len({c["id"] for c in preset["checkpoints"]}) == len(preset["checkpoints"])
    for checkpoint in preset["checkpoints"]:
        assert checkpoint["dtype"] in DTYPES and checkpoint["attn_implementation"] == CAPTURE_ATTENTION


def test_an_image_the_processor_does_not_split_has_only_its_global_view():
    loaded = load_model("random:idefics3", device="cpu")
    loaded.processor.image_processor.do_image_splitting = False
    image = make_scene(100, 60)
    inputs = build_inputs(loaded, [image], "Describe the image.")
    (layout,) = loaded.family.image_layouts(loaded.model, loaded.processor, inputs, [image])
    assert [v.name for v in layout.views] == ["global"] and layout.positions.shape == (4, 4)
    image_tokens = (inputs["input_ids"][0] == loaded.model.config.image_token_id).nonzero().flatten().tolist()
    assert layout.positions.ravel().tolist() == image_tokens and len(layout.separators) == 3
    assert layout.box == (0.0, 0.0, 100.0, 60.0)


@pytest.mark.parametrize("preset", ["llava_next", "llava_onevision", "idefics3", "smolvlm"])
def test_a_saved_checkpoint_loads_from_its_folder_with_the_same_layout_and_answer(tmp_path, preset):
    """The real checkpoints' path (AutoConfig, AutoModelForImageTextToText, the family's processor), offline; the
    folder also names a video processor, as the hub checkpoints do, which CPU installs cannot build."""
    built = load_model(f"random:{preset}", device="cpu")
    built.model.save_pretrained(tmp_path)
    built.processor.save_pretrained(tmp_path)
    (tmp_path / "video_preprocessor_config.json").write_text('{"video_processor_type": "NoSuchVideoProcessor"}')
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.family is built.family
    image, options = make_scene(100, 60), GenerationOptions(max_new_tokens=2)
    first = generate_with_capture(built, [image], "Describe the image.", options)
    second = generate_with_capture(loaded, [image], "Describe the image.", options)
    assert second.images == first.images and second.answer_ids == first.answer_ids


def test_a_llava_next_checkpoint_keeping_clip_cls_in_its_tiles_is_refused_with_one_message():
    loaded = load_model("random:llava_next", device="cpu")
    image = make_scene(100, 60)
    inputs = build_inputs(loaded, [image], "Describe the image.")
    loaded.model.config.vision_feature_select_strategy = "full"
    with pytest.raises(UserInputError, match="vision_feature_select_strategy 'full' are not supported; use one with "
                                             "'default'"):
        loaded.family.image_layouts(loaded.model, loaded.processor, inputs, [image])
