import json

import torch

from lvlm_interpret import GenerationOptions, generate_with_capture, get_method, load_model
from lvlm_interpret.bench import run_bench
from lvlm_interpret.cli import main
from lvlm_interpret.demo.scenes import DESCRIBE_PROMPT, draw_scene
from lvlm_interpret.models.loading import _build_random


def test_bench_reports_every_figure(qwen2_vl):
    figures = run_bench(qwen2_vl, 4, ["attention", "tam", "relevancy"], repeats=1, image_size=96)
    json.dumps(figures)  # what `bench --out` writes
    assert figures["answer_tokens"] == 4  # the answer length is fixed for comparable figures
    assert figures["plain_generation_s"] > 0 and figures["capture_generation_s"] > 0
    assert figures["trace_bytes"] > 0 and figures["peak_memory_mb"] > 0
    assert set(figures["methods"]) == {"attention", "tam", "relevancy"}
    assert figures["methods"]["relevancy"]["all_tokens_one_at_a_time_s"] > 0
    assert figures["forward_backward_s"] > 0 and figures["methods"]["relevancy"]["batched_speedup_x"] > 0
    assert all(p.grad is None for p in qwen2_vl.model.parameters())  # the yardstick leaves no gradients behind
    assert all(row["one_token_s"] > 0 and row["all_tokens_s"] > 0 for row in figures["methods"].values())
    assert all(row["first_click_s"] > 0 for row in figures["methods"].values())
    assert figures["dtype"] == "float32" and figures["environment"]["device_name"].startswith("CPU")


def test_bench_figures_become_one_markdown_page(tmp_path):
    """`bench --out` on two models, then `bench-report`: one column per run with every figure the GPU check
    reports, the date, the machine, the versions and the commands."""
    runs = []
    for name in ("llava", "qwen2_vl"):
        runs.append(tmp_path / f"{name}.json")
        # iGOS++ with fewer iterations, as on a CPU: the options are in the command and the page
        igos = ["--methods", "attention,tam,relevancy,cleann,igos", "--option", "igos.iterations=1",
                "--option", "igos.ig_steps=1"] if name == "llava" else []
        assert main(["bench", "--model", f"random:{name}", "--device", "cpu", "--answer-tokens", "3",
                     "--repeats", "1", "--image-size", "96", *igos, "--out", str(runs[-1])]) == 0
    page_path = tmp_path / "docs" / "results.md"
    assert main(["bench-report", *map(str, runs), "--written-by", "make gpu-check", "--out", str(page_path)]) == 0
    page = page_path.read_text()
    assert "Written by `make gpu-check`" in page
    assert f"python -m lvlm_interpret bench --model random:llava --device cpu --dtype auto --answer-tokens 3 " \
           f"--methods attention,tam,relevancy,cleann,igos --repeats 1 --image-size 96 --option igos.iterations=1 " \
           f"--option igos.ig_steps=1 --out {runs[0]}" in page
    table = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in page.splitlines()
             if line.startswith("| ")}
    assert table[""] == ["`random:llava`", "`random:qwen2_vl` |"]
    assert all(len(cells) == 2 for cells in table.values())
    assert table["device"][0].startswith("CPU (") and "cpu, float32" in table["device"][0]
    assert table["versions"][0].startswith(f"torch {torch.__version__}")
    assert "target <= 1.3x" in table["generation with capture"][0]
    for method in ("attention", "tam", "relevancy"):
        assert table[f"{method}: first click / one token / all tokens"][0].count(" / ") == 2
    assert table["cleann: first click / one token / all tokens"][0].endswith("/ -")  # no all-tokens run
    assert table["igos: first click / one token / all tokens"][0].count(" / ") == 2
    assert table["igos: first click / one token / all tokens"][1] == "not run |"
    assert table["method options"] == ["igos: iterations=1, ig_steps=1", "the defaults |"]
    assert "x)" in table["relevancy, all tokens batched / one at a time"][0]
    assert "process max RSS" in table["peak memory"][0]


def test_bench_report_says_which_file_is_not_bench_figures(tmp_path, capsys):
    other = tmp_path / "result.json"
    other.write_text(json.dumps({"model": "demo"}))
    assert main(["bench-report", str(other), "--out", str(tmp_path / "page.md")]) == 2
    assert f"{other} is not a figures file of `python -m lvlm_interpret bench --out`" in capsys.readouterr().err
    assert not (tmp_path / "page.md").exists()


def test_random_presets_never_answer_with_image_layout_tokens():
    """An untrained model may rank an image placeholder first; written into the answer, it would break every replay
    of that answer (relevancy, CLEANN, bench). This scene made random:qwen2_vl answer <|image_pad|> twice."""
    for name in ("qwen2_vl", "llava"):
        loaded = load_model(f"random:{name}", device="cpu")
        trace = generate_with_capture(loaded, [draw_scene(10 ** 9, 64).image], DESCRIBE_PROMPT,
                                      GenerationOptions(max_new_tokens=3, min_new_tokens=3))
        assert loaded.model.config.image_token_id not in trace.answer_ids
        assert get_method("relevancy").explain(trace, 0, model=loaded).maps[0].size > 0


def test_bench_command_rejects_a_bad_image_size(tmp_path, capsys):
    assert main(["bench", "--image-size", "5", "--out", str(tmp_path / "bench.json")]) == 2
    assert "--image-size must be between" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_large_presets_have_the_real_models_shapes():
    """Built on the meta device (no memory): the decoder and vision tower match LLaVA-1.5-7B and Qwen2-VL-2B."""
    llava, _, family = _build_random("llava-7b", torch.bfloat16, torch.device("meta"))
    per_layer = 4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096  # attention, MLP, two RMSNorms
    assert _parameters(family.language_model(llava).layers) == 32 * per_layer
    assert _parameters(llava.model.vision_tower) == 303_507_456  # CLIP ViT-L/14 at 336 px
    assert llava.dtype == torch.bfloat16
    qwen, _, family = _build_random("qwen2_vl-2b", torch.bfloat16, torch.device("meta"))
    per_layer = (2 * 1536 * 1536 + 1536) + 2 * (1536 * 256 + 256) + 3 * 1536 * 8960 + 2 * 1536
    assert _parameters(family.language_model(qwen).layers) == 28 * per_layer
    blocks = family.vision_layers(qwen)
    assert len(blocks) == 32 and blocks[0].attn.num_heads == 16
