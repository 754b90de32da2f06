"""The CLEANN study's figures on hand records, its option parsing and its resume rule (no model run)."""

import json

import pytest

from lvlm_interpret import UserInputError
from lvlm_interpret.evaluation.cleann_study import parse_option, run_study, summarise


def _record(scene, verified, set_size, image_cells, inside, seconds=0.2):
    return {"scene": scene, "verified": verified, "set_size": set_size, "image_cells": image_cells,
            "cells_inside": inside, "object_cells": 9, "object_and_border_cells": 25, "seconds": seconds,
            "cpu_seconds": seconds / 2,
            "forwards": 10, "load_average": 2.0}


def test_summary_pools_cells_over_sets_and_also_averages_them_per_set():
    records = [_record(0, True, 10, 10, 10), _record(0, True, 30, 30, 15), _record(1, False, 0, 0, 0)]
    summary = summarise(records)
    assert summary["verified_share"] == pytest.approx(2 / 3)
    assert summary["empty_set_share"] == pytest.approx(1 / 3)
    assert summary["cells_inside_share"] == pytest.approx(25 / 40)  # pooled
    assert summary["cells_inside_share_per_set"] == pytest.approx((1 + 0.5) / 2)
    assert summary["median_set_size"] == 10 and summary["median_object_and_border_cells"] == 25
    assert summary["share_sets_within_object_and_border"] == pytest.approx(2 / 3)
    assert summary["n_scenes"] == 2
    assert summary["cpu_seconds_per_token_median"] == pytest.approx(0.1)  # the compute, apart from the wall time


def test_options_are_read_as_json_values_where_they_are():
    assert parse_option("layer=2") == ("layer", 2)
    assert parse_option("region=false") == ("region", False)
    assert parse_option("preset=paper") == ("preset", "paper")
    with pytest.raises(UserInputError, match="NAME=VALUE"):
        parse_option("layer")


def test_a_run_resumes_only_with_the_options_it_was_written_with(tmp_path):
    records = tmp_path / "study.jsonl"
    records.write_text(json.dumps({"options": {"layer": 1}}) + "\n")
    with pytest.raises(UserInputError, match="other options"):
        run_study(10, {"layer": 2}, records)
