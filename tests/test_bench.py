import json

from lvlm_interpret.cli import main


def test_bench_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "random:qwen2_vl", "--answer-tokens", "4", "--repeats", "1",
                 "--methods", "attention,tam,relevancy", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["answer_tokens"] == 4  # the answer length is fixed for comparable figures
    assert figures["plain_generation_s"] > 0 and figures["capture_generation_s"] > 0
    assert figures["trace_bytes"] > 0 and figures["peak_memory_mb"] > 0
    assert set(figures["methods"]) == {"attention", "tam", "relevancy"}
    assert figures["methods"]["relevancy"]["all_tokens_one_at_a_time_s"] > 0
    assert all(row["one_token_s"] > 0 and row["all_tokens_s"] > 0 for row in figures["methods"].values())
