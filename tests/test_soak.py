"""The soak test (`make soak`) as its reader uses it, in a few seconds: its report's tables, figure and raw figures,
with "busy, retry" answers counted apart from errors."""

import json

import pytest

from lvlm_interpret import soak

# the cheap requests, so that the requests still in flight at the end finish within seconds
QUICK_KINDS = ("explain:attention", "explain:tam", "attention-overview", "reverse-attention", "logit-lens",
               "analysis-tokens")


def test_a_short_soak_reports_latency_memory_and_no_errors(tmp_path):
    # one slot and no queue: the two clients are told "busy, retry" and wait out Retry-After
    soak.main(["--minutes", "0.15", "--clients", "2", "--concurrency", "1", "--queue", "0", "--sample-s", "0.5",
               "--kinds", ",".join(QUICK_KINDS), "--out", str(tmp_path)])
    figures = json.loads((tmp_path / "soak.json").read_text())
    assert figures["errors"] == [] and figures["totals"]["errors"] == 0
    assert figures["totals"]["busy_refusals"] > 0
    assert {"busy", "ok"} == {request["outcome"] for request in figures["requests"]}
    assert figures["totals"]["answered"] == sum(row["count"] for row in figures["latency_s"].values())
    assert "generate" in figures["latency_s"] and set(figures["latency_s"]) <= {"generate", *QUICK_KINDS}
    for row in figures["latency_s"].values():
        assert 0 < row["p50_s"] <= row["p95_s"] <= row["p99_s"] <= row["max_s"]
    assert len(figures["samples"]) >= 2 and all(sample["rss_mb"] > 0 for sample in figures["samples"])
    assert figures["rss_mb"]["peak"] == max(sample["rss_mb"] for sample in figures["samples"])
    assert figures["settings"]["rate_limit"] is None and figures["machine"]["cores"] >= 1

    readme = (tmp_path / "README.md").read_text()
    assert "python -m lvlm_interpret.soak --minutes 0.15 --clients 2" in readme
    for heading in ("| request | count | p50 | p95 | p99 | max |", "## Errors\n\nNone.", "| minute | RSS (MB) |"):
        assert heading in readme
    assert "| generate |" in readme and "cores" in readme
    html = (tmp_path / "rss.html").read_text()
    assert "plotly" in html and '"RSS"' in html


@pytest.mark.parametrize("arguments, message", [
    (["--kinds", "explain:nope"], "--kinds: unknown explain:nope; choose from explain:attention"),
    (["--minutes", "0"], "--minutes must be above 0"),
    (["--queue", "-1"], "--queue must be 0 or more"),
])
def test_bad_arguments_say_what_to_change(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit):
        soak.main([*arguments, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing run, nothing written
