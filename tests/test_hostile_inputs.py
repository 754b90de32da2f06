"""Hostile inputs a stranger sends a hosted demo (issue 20): each is refused with one message saying what is
allowed, over HTTP, from the CLI and in the page, instead of a 500, a traceback or a silent reinterpretation."""

import json
import struct
import zlib

import pytest

from components.generation import run_generation
from lvlm_interpret import GenerationOptions, UserInputError, generate_with_capture
from lvlm_interpret.cli import main
from lvlm_interpret.images import MAX_PIXELS
from tests.conftest import make_scene
from tests.test_server import _png, http, service  # noqa: F401 (fixtures: a random LLaVA, and it over HTTP)


def _generate(http, prompt="Describe the image.", **fields):
    return http.post("/v1/generate", files={"image": ("s.png", _png(make_scene()), "image/png")},
                     data={"prompt": prompt, "max_new_tokens": "3", **fields})


@pytest.fixture(scope="module")
def summary(http):
    response = _generate(http)
    assert response.status_code == 200
    return response.json()


def _one_line(response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert message and "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def scene_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    make_scene().save(path)
    return path


def _cli_error(capsys, argv) -> str:
    """Run the CLI; it must exit 2 with one `error:` line on stderr (no traceback)."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _explain(scene_path, out, *extra, prompt="Describe the image."):
    return ["explain", "--image", str(scene_path), "--prompt", prompt, "--model", "random:llava",
            "--max-new-tokens", "2", "--out", str(out), *extra]


# --- knockout and ablation positions -------------------------------------------------------------------------
@pytest.mark.parametrize("position", [-1000, -1, "predicting", 100000])
def test_knockout_refuses_positions_it_cannot_block(http, summary, position):
    predicting = summary["prompt_length"] - 1  # the position whose logits give answer token 0
    position = predicting if position == "predicting" else position
    response = http.post("/v1/knockout", json={"request_id": summary["request_id"], "positions": [2, position],
                                               "windows": ["early"]})
    message = _one_line(response)
    assert f"knockout positions must lie in 0..{predicting - 1}" in message and str(position) in message


def test_knockout_of_earlier_positions_still_runs(http, summary):
    response = http.post("/v1/knockout", json={"request_id": summary["request_id"], "positions": [2, 1, 2],
                                               "windows": ["early"]})
    assert response.status_code == 200
    assert response.json()["keys"] == [1, 2]


@pytest.mark.parametrize("position", [-1, 0, 100000])
def test_ablation_names_the_image_token_positions(http, service, summary, position):
    response = http.post("/v1/ablate", json={"request_id": summary["request_id"], "positions": [position],
                                             "replacement": "zero"})
    message = _one_line(response)
    cells = service.trace(summary["request_id"]).images[0].cell_positions
    assert f"image-token positions (the image grid's cells, in {cells.min()}..{cells.max()})" in message
    assert str(position) in message


def test_random_token_set_refuses_a_negative_seed(http, summary):
    response = http.post("/v1/analysis-tokens", json={"request_id": summary["request_id"], "kind": "random",
                                                      "k": 3, "seed": -1})
    assert "seed" in _one_line(response)


# --- the model's image placeholder in a prompt ---------------------------------------------------------------
def test_image_placeholder_in_the_prompt_is_refused_over_http(http):
    message = _one_line(_generate(http, "<image> Describe the image."))
    assert "<image>" in message and "remove it from the prompt" in message


def test_image_placeholder_in_the_prompt_is_refused_by_the_cli(tmp_path, scene_path, capsys):
    line = _cli_error(capsys, _explain(scene_path, tmp_path / "out", prompt="Describe <image> this."))
    assert "<image>" in line and "remove it" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,placeholder", [("qwen2_vl", "<|vision_start|>"), ("qwen2_vl", "<|image_pad|>"),
                                              ("qwen2_vl", "<|video_pad|>"), ("gemma3", "<start_of_image>"),
                                              ("gemma3", "<image_soft_token>"), ("mistral3", "[IMG_END]"),
                                              ("internvl", "<IMG_CONTEXT>"), ("smolvlm", "<image>")])
def test_every_familys_image_placeholders_are_refused(models, name, placeholder):
    """Found from the processor's, tokenizer's and config's own names for them, so every family is covered."""
    with pytest.raises(UserInputError, match="remove it from the prompt") as refused:
        generate_with_capture(models(name), [make_scene()], f"What is {placeholder} here?",
                              GenerationOptions(max_new_tokens=2))
    assert placeholder in str(refused.value)


def test_a_prompt_that_only_mentions_an_image_is_answered(models):
    trace = generate_with_capture(models("qwen2_vl"), [make_scene()], "Describe the image <image>.",
                                  GenerationOptions(max_new_tokens=2))
    assert trace.n_answer == 2  # "<image>" is no placeholder of Qwen2-VL: just text


# --- generation options --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [str(2 ** 64), "-1"])
def test_a_seed_outside_64_bits_is_refused(http, tmp_path, scene_path, capsys, seed):
    assert "seed" in _one_line(_generate(http, temperature="0.7", seed=seed))
    line = _cli_error(capsys, _explain(scene_path, tmp_path / "out", "--temperature", "0.7", "--seed", seed))
    assert f"between 0 and {2 ** 64 - 1}" in line and seed in line


def test_the_largest_64_bit_seed_samples(http):
    assert _generate(http, temperature="0.7", seed=str(2 ** 64 - 1)).status_code == 200


@pytest.mark.parametrize("temperature", [-1.0, float("nan"), float("inf")])
def test_a_bad_temperature_is_refused_not_read_as_greedy(http, service, temperature):
    """The page's generate handler and the backend refuse it instead of answering greedily."""
    with pytest.raises(UserInputError, match=r"temperature must be 0 \(greedy\) or between 0.01 and 10"):
        run_generation(service, make_scene(), "Describe the image.", None, 2, temperature, 1.0)
    assert "temperature" in _one_line(_generate(http, temperature=str(temperature)))


def test_temperature_0_is_greedy(tmp_path, scene_path, service):
    _, trace = run_generation(service, make_scene(), "Describe the image.", None, 2, 0.0, 1.0)
    assert trace.generation["do_sample"] is False
    assert main(_explain(scene_path, tmp_path / "out", "--temperature", "0")) == 0
    assert json.loads((tmp_path / "out" / "result.json").read_text())["generation"]["do_sample"] is False


# --- decompression bombs -------------------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds none: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(20_000, 10_000), (9_000, 9_000)])  # beyond PIL's own limit; beyond ours
def test_a_decompression_bomb_is_too_large_not_unreadable(http, tmp_path, capsys, width, height):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(width, height))
    line = _cli_error(capsys, ["explain", "--image", str(bomb), "--prompt", "Describe the image.", "--model",
                               "random:llava", "--out", str(tmp_path / "out")])
    assert "too large" in line and f"{MAX_PIXELS:,} pixels" in line
    response = http.post("/v1/generate", files={"image": ("bomb.png", bomb.read_bytes(), "image/png")},
                         data={"prompt": "Describe the image."})
    assert "too large" in _one_line(response, 413)
