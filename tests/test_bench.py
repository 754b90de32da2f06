import json

import torch

from lvlm_interpret.bench import run_bench
from lvlm_interpret.cli import main
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
