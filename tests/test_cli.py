"""The `explain` command writes the documented contract and rejects bad input with exit 2, writing nothing."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lvlm_interpret import get_method, load_image, load_model
from lvlm_interpret.cli import main
from lvlm_interpret.rendering import blend, overlay
from tests.conftest import make_scene


@pytest.fixture(scope="module")
def scene_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    make_scene(160, 96).save(path)
    return path


def _explain(*extra, scene, out):
    return main(["explain", "--image", str(scene), "--prompt", "Describe the image.", "--max-new-tokens", "5",
                 "--out", str(out), *extra])


def test_contract(tmp_path, scene_path, llava):
    out = tmp_path / "run"
    assert _explain("--model", "random:llava", "--png", scene=scene_path, out=out) == 0
    result = json.loads((out / "result.json").read_text())
    assert {"model", "prompt", "answer", "tokens", "image", "methods", "timings_s"} <= result.keys()
    assert result["model"] == "random:llava" and result["methods"] == ["attention"]
    n = len(result["tokens"])
    assert n == 5 and [t["index"] for t in result["tokens"]] == list(range(n))
    assert all(isinstance(t["id"], int) and isinstance(t["text"], str) for t in result["tokens"])
    assert result["image"] == {"width": 160, "height": 96, "grid": [8, 8], "box": [32.0, 0.0, 128.0, 96.0]}
    assert all(value >= 0 for value in result["timings_s"].values())
    assert len(result["llr"]) == n and len(result["visually_relevant"]) == n
    maps = np.load(out / "maps.npz")
    assert list(maps.keys()) == ["attention"]
    assert maps["attention"].shape == (n, 8, 8) and maps["attention"].dtype == np.float32
    assert (maps["attention"] >= 0).all()
    # the file holds the library's maps for the same generation
    from lvlm_interpret import GenerationOptions, generate_with_capture
    trace = generate_with_capture(llava, [load_image(scene_path)], "Describe the image.",
                                  GenerationOptions(max_new_tokens=5))
    assert [t["id"] for t in result["tokens"]] == trace.answer_ids
    for t in range(n):
        np.testing.assert_allclose(maps["attention"][t], get_method("attention").explain(trace, t).maps[0])
    assert len(list((out / "overlays").glob("attention_token*.png"))) == n
    # each overlay PNG: the token's map over the image at the image's size, its colour bar and caption below
    for t in range(n):
        png = np.asarray(Image.open(out / "overlays" / f"attention_token{t}.png").convert("RGB"))
        assert png.shape[1] == 160 and png.shape[0] > 96
        expected = blend(load_image(scene_path), overlay(maps["attention"][t], trace.images[0]))
        np.testing.assert_array_equal(png[:96], np.asarray(expected))
    assert not list(out.glob(".staging-*"))


def test_all_methods_write_every_array_and_cleann_for_chosen_tokens(tmp_path, scene_path):
    out = tmp_path / "all"
    assert _explain("--model", "random:qwen2_vl", "--methods", "all", "--tokens", "1,3", scene=scene_path,
                    out=out) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["methods"] == ["attention", "cleann", "igos", "relevancy", "tam"]
    grid = result["image"]["grid"]
    maps = np.load(out / "maps.npz")
    expected = {"attention", "cleann", "igos", "relevancy", "relevancy_vit", "relevancy_all", "tam", "tam_raw",
                "tam_cleaned"}
    assert set(maps.keys()) == expected | {"igos_answer"}
    assert maps["igos_answer"].shape == (1, *grid)
    for name in expected:
        assert maps[name].shape == (2, *grid) and (maps[name] >= 0).all(), name
    assert set(result["cleann"]) == {"1", "3"}
    record = result["cleann"]["1"]
    assert {"image_cells", "text_tokens", "prob_before", "prob_after", "edges"} <= record.keys()
    assert len(result["llr"]) == len(result["answer_tokens"])
    # without --tokens, "all" leaves out the per-token causal search and mask optimisation
    assert _explain("--model", "random:qwen2_vl", "--methods", "all", scene=scene_path, out=tmp_path / "b") == 0
    assert {"cleann", "igos"}.isdisjoint(json.loads((tmp_path / "b" / "result.json").read_text())["methods"])


def test_method_options_reach_the_methods_and_the_record(tmp_path, scene_path):
    out = tmp_path / "options"
    assert _explain("--model", "random:qwen2_vl", "--methods", "relevancy,cleann,tam", "--tokens", "1",
                    "--option", "cleann.head=0", "--option", "cleann.layer=-2", "--option", "relevancy.vision=false",
                    "--option", "tam.denoise=false", scene=scene_path, out=out) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method_options"]["cleann"] == {"head": 0, "layer": -2}
    assert result["method_options"]["relevancy"] == {"vision": False}
    n_layers = load_model("random:qwen2_vl").model.config.get_text_config().num_hidden_layers
    assert result["cleann"]["1"]["head"] == 0 and result["cleann"]["1"]["layer"] == n_layers - 2
    maps = np.load(out / "maps.npz")
    assert "relevancy" in maps and "relevancy_vit" not in maps and "relevancy_all" not in maps
    # unfiltered TAM: the main map is the interference-removed one
    np.testing.assert_array_equal(maps["tam"], maps["tam_cleaned"])


def test_unknown_option_names_the_methods_options(tmp_path, scene_path, capsys):
    assert _explain("--methods", "cleann", "--tokens", "0", "--option", "cleann.heads=2", scene=scene_path,
                    out=tmp_path / "x") == 2
    message = capsys.readouterr().err
    assert "cleann" in message and "layer, head, alpha" in message
    assert _explain("--methods", "tam", "--option", "tam.denoise=no", scene=scene_path, out=tmp_path / "y") == 2
    assert "tam: option denoise must be true or false, got 'no'" in capsys.readouterr().err


def test_selected_tokens_and_two_images(tmp_path, scene_path):
    second = tmp_path / "tall.png"
    make_scene(90, 200).save(second)
    out = tmp_path / "two"
    code = main(["explain", "--image", str(scene_path), "--image", str(second), "--model", "random:qwen2_vl",
                 "--prompt", "Compare the images.", "--max-new-tokens", "4", "--tokens", "2,0", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    assert [t["index"] for t in result["tokens"]] == [2, 0]
    assert len(result["answer_tokens"]) == 4
    grids = result["image"]["grid"]
    assert len(grids) == 2 and result["image"]["width"] == [160, 90]
    maps = np.load(out / "maps.npz")
    assert sorted(maps.keys()) == ["attention_image0", "attention_image1"]
    assert maps["attention_image0"].shape == (2, *grids[0])
    assert maps["attention_image1"].shape == (2, *grids[1])


def _bad_inputs(tmp_path, scene_path):
    text_file = tmp_path / "notes.png"
    text_file.write_text("this is not an image")
    return {
        "missing file": ["--image", str(tmp_path / "nope.png"), "--prompt", "hi"],
        "not an image": ["--image", str(text_file), "--prompt", "hi"],
        "empty prompt": ["--image", str(scene_path), "--prompt", "   "],
        "unknown model": ["--image", str(scene_path), "--prompt", "hi", "--model", "random:nothing"],
        "unknown hub model": ["--image", str(scene_path), "--prompt", "hi", "--model", "nobody/no-such-model"],
        "unknown method": ["--image", str(scene_path), "--prompt", "hi", "--methods", "attention,saliency"],
        "token out of range": ["--image", str(scene_path), "--prompt", "hi", "--max-new-tokens", "3",
                               "--tokens", "0,7"],
        "bad token list": ["--image", str(scene_path), "--prompt", "hi", "--tokens", "first"],
        "bad layer": ["--image", str(scene_path), "--prompt", "hi", "--max-new-tokens", "2", "--layers", "40"],
        "bad max tokens": ["--image", str(scene_path), "--prompt", "hi", "--max-new-tokens", "0"],
        "malformed option": ["--image", str(scene_path), "--prompt", "hi", "--option", "cleann"],
        "option of a method not run": ["--image", str(scene_path), "--prompt", "hi", "--option", "tam.denoise=false"],
        "unknown option": ["--image", str(scene_path), "--prompt", "hi", "--methods", "tam", "--option",
                           "tam.smooth=1"],
        "bad option value": ["--image", str(scene_path), "--prompt", "hi", "--methods", "relevancy", "--option",
                             "relevancy.vision=maybe"],
        "option of another type": ["--image", str(scene_path), "--prompt", "hi", "--methods", "tam,cleann",
                                   "--option", "tam.denoise=False"],
        "option naming the model": ["--image", str(scene_path), "--prompt", "hi", "--methods", "relevancy",
                                    "--option", "relevancy.model=x"],
    }


@pytest.mark.parametrize("case", ["missing file", "not an image", "empty prompt", "unknown model",
                                  "unknown hub model", "unknown method", "token out of range", "bad token list",
                                  "bad layer", "bad max tokens", "malformed option", "option of a method not run",
                                  "unknown option", "bad option value", "option of another type",
                                  "option naming the model"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, scene_path, capsys):
    out = tmp_path / "out"
    code = main(["explain", *_bad_inputs(tmp_path, scene_path)[case], "--out", str(out)])
    stderr = capsys.readouterr().err.strip()
    assert code == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ")
    assert not out.exists() or not any(out.iterdir())


def test_missing_required_argument_is_one_line(capsys):
    assert main(["explain", "--prompt", "hi"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_module_entry_point_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lvlm_interpret", "explain", "--image", str(tmp_path / "x.png"),
                             "--prompt", "hi", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "image file not found" in result.stderr
