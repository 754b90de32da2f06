"""Comparing two requests: the alignment of their words, compare.json's contract from the CLI, the same result in
process and over HTTP, and compare-models' statistics and paired tests."""

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from lvlm_interpret import ExplainService, compare_requests, generate_pair, load_image
from lvlm_interpret.cli import main
from lvlm_interpret.client import RemoteService
from lvlm_interpret.compare import align_tokens, map_similarity
from lvlm_interpret.errors import UnknownRequestError, UserInputError
from lvlm_interpret.evaluation.model_comparison import normalised_entropy, paired_test, top_spread
from lvlm_interpret.server import create_api
from lvlm_interpret.trust import agreement

EXAMPLES = "assets/examples/"
THREE_OBJECTS = EXAMPLES + "yellow-square-red-square-blue-triangle.png"  # "a yellow square, a red square and ..."
TRIANGLE = EXAMPLES + "red-triangle.png"  # "a red triangle."


def test_repeated_words_pair_with_their_counterpart_in_the_same_place():
    a = "a red circle and a red square".split()
    b = "a blue circle and a red square".split()
    assert align_tokens(a, b) == [(0, 0), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6)]
    # B's one "a red" is A's second one, the one followed by the same words
    assert align_tokens(a, "a red square".split()) == [(4, 0), (5, 1), (6, 2)]


def test_insertions_and_deletions_shift_the_pairs():
    a = ["The", " cat", " sat", "."]
    b = ["the", " big", " cat", " sat", " down", "."]
    assert align_tokens(a, b) == [(0, 0), (1, 2), (2, 3), (3, 5)]
    assert align_tokens(b, a) == [(0, 0), (2, 1), (3, 2), (5, 3)]
    assert align_tokens([" ", "yes"], ["yes", " "]) == [(1, 0)]  # whitespace never pairs
    assert align_tokens(["yes"], ["no"]) == []


def test_map_similarity_on_one_grid_and_across_grids():
    peak = np.zeros((12, 12), np.float32)
    peak[2, 3] = 1.0
    same = map_similarity(peak, peak)
    assert same["top_iou"] == 1.0 and same["argmax_shift_cells"] == 0.0
    moved = np.zeros((12, 12), np.float32)
    moved[5, 7] = 1.0
    assert map_similarity(peak, moved)["argmax_shift_cells"] == 5.0  # 3 rows and 4 columns
    # a 6x6 map is resampled onto the 12x12 grid: its peak at (1, 1) covers A's cells 2-3, so the shift is at most 1
    coarse = np.zeros((6, 6), np.float32)
    coarse[1, 1] = 1.0
    across = map_similarity(peak, coarse)
    assert across["argmax_shift_cells"] <= 1.5 and set(across) == {"spearman", "top_iou", "argmax_shift_cells"}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    assert main(["compare", "--image", THREE_OBJECTS, "--image-b", TRIANGLE, "--prompt", "Describe the image.",
                 "--model", "demo", "--methods", "attention,relevancy,tam", "--out", str(out)]) == 0
    return out


def test_compare_writes_both_requests_and_compare_json(compared):
    comparison = json.loads((compared / "compare.json").read_text())
    results = {side: json.loads((compared / side / "result.json").read_text()) for side in "ab"}
    assert comparison["a"]["answer"] == results["a"]["answer"] == "a yellow square, a red square and a blue triangle."
    assert comparison["b"]["answer"] == results["b"]["answer"] == "a red triangle."
    assert comparison["b"]["image"] == results["b"]["image"] and comparison["grids_match"] is True
    # every answer token of each side, explain's contract
    for side in "ab":
        maps = np.load(compared / side / "maps.npz")
        n = len(results[side]["answer_tokens"])
        assert [t["index"] for t in results[side]["tokens"]] == list(range(n))
        assert results[side]["methods"] == ["attention", "relevancy", "tam"]
        assert set(maps) == {"attention", "relevancy", "relevancy_vit", "relevancy_all", "tam", "tam_raw",
                             "tam_cleaned"}
        assert len(comparison["image_share"][side]) == n
        assert all(0 <= share <= 1 for share in comparison["image_share"][side])
    # B's "a red triangle ." pairs with A's second "a red" and its "triangle ."
    assert [(p["a"], p["b"], p["text"]) for p in comparison["pairs"]] == [
        (4, 0, "a"), (5, 1, "red"), (10, 2, "triangle"), (11, 3, ".")]
    maps_a, maps_b = np.load(compared / "a" / "maps.npz"), np.load(compared / "b" / "maps.npz")
    for pair in comparison["pairs"]:
        assert set(pair["similarity"]) == set(maps_a)
        for name, similarity in pair["similarity"].items():
            assert similarity == map_similarity(maps_a[name][pair["a"]], maps_b[name][pair["b"]])
            assert {k: similarity[k] for k in ("spearman", "top_iou")} == agreement(maps_a[name][pair["a"]],
                                                                                   maps_b[name][pair["b"]])


@pytest.mark.parametrize("case, message", [
    ([], "request B is the same as request A"),
    (["--prompt-b", "  "], "prompt of request B is empty"),
    (["--prompt-b", "Describe.", "--methods", "gradcam"], "gradcam"),
    (["--image-b", "missing.png"], "missing.png"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--image", TRIANGLE, "--prompt", "Describe the image.", *case, "--out", str(out)]) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("error: ") and message in stderr and "\n" not in stderr
    assert not out.exists() or not any(out.iterdir())


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("")
    assert main(["compare", "--image", TRIANGLE, "--prompt", "Describe the image.", "--prompt-b", "Describe.",
                 "--out", str(out)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_http_and_in_process_give_the_same_comparison():
    service = ExplainService("demo", allowed_models=["demo", "random:llava"])
    remote = RemoteService(client=TestClient(create_api(service)))
    image, image_b = load_image(THREE_OBJECTS), load_image(TRIANGLE)
    local_ids = generate_pair(service, image, "Describe the image.", image_b=image_b)
    remote_ids = generate_pair(remote, image, "Describe the image.", image_b=image_b)
    in_process = compare_requests(service, *local_ids)
    assert in_process["pairs"]
    assert remote.compare(*remote_ids) == in_process  # computed by the backend
    assert compare_requests(remote, *remote_ids) == in_process  # computed here from the backend's maps
    # across models the grids differ (12x12 and 8x8): said so
    across = remote.compare(*generate_pair(remote, image, "Describe the image.", model_b="random:llava"))
    assert across["grids_match"] is False and across["b"]["image"]["grid"] == [8, 8]
    with pytest.raises(UnknownRequestError):
        compare_requests(service, local_ids[0], "no-such-id")
    with pytest.raises(UserInputError, match="gradcam"):
        remote.compare(*remote_ids, methods=["gradcam"])
    assert "/v1/compare" in remote._client.get("/openapi.json").json()["paths"]


def test_where_a_model_looks_statistics():
    uniform, peak = np.ones((4, 4)), np.zeros((4, 4))
    peak[1, 2] = 1
    assert normalised_entropy(uniform) == pytest.approx(1.0) and normalised_entropy(peak) == 0.0
    assert normalised_entropy(np.zeros((4, 4))) is None
    compact, scattered = np.zeros((10, 10)), np.zeros((10, 10))  # top 10%: 10 cells
    compact[4:6, 3:8] = 1
    scattered[[0, 0, 9, 9, 0, 9, 5, 5, 2, 7], [0, 9, 0, 9, 5, 5, 0, 9, 2, 7]] = 1
    assert 0 < top_spread(compact) < 0.3 < top_spread(scattered)
    same = paired_test([0.1, 0.2, None], [0.1, 0.2, 0.5])
    assert same["n_pairs"] == 2 and same["p_value"] == 1.0 and same["n_b"] == 3 and same["mean_b"] == 0.2667
    apart = paired_test(list(np.linspace(0, 1, 12)), list(np.linspace(0, 1, 12) + 0.5))
    assert apart["p_value"] < 0.01 and apart["median_difference"] == 0.5


def test_compare_models_writes_the_table_json_and_figure(tmp_path, capsys):
    out = tmp_path / "models"
    assert main(["compare-models", "--dataset", "shapes", "--n", "2", "--model", "demo", "--model-b", "demo",
                 "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "compare-models.json").read_text())
    assert result["model_a"] == result["model_b"] == "demo" and len(result["samples"]) == 2
    for statistic, row in result["statistics"].items():  # a model against itself: no difference anywhere
        assert row["n_pairs"] == 2 and row["p_value"] == 1.0 and row["mean_a"] == row["mean_b"], statistic
    assert result["statistics"]["pointing_relevancy"]["mean_a"] > 0.5  # the demo model's relevancy finds objects
    table = (out / "compare-models.md").read_text()
    assert table in capsys.readouterr().out and "| pointing_relevancy |" in table
    assert "plotly" in (out / "compare-models.html").read_text()[:100000].lower()


def test_compare_models_needs_a_second_model(tmp_path, capsys):
    assert main(["compare-models", "--dataset", "shapes", "--out", str(tmp_path / "x")]) == 2
    assert "--model-b" in capsys.readouterr().err
    assert main(["compare-models", "--n", "0", "--model-b", "demo", "--out", str(tmp_path / "x")]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err


def test_the_compare_tab_shows_the_same_on_both_backends():
    from components.compare_panel import render, run_compare, select_word
    from components.generation import run_generation

    service = ExplainService("demo")
    remote = RemoteService(client=TestClient(create_api(service)))
    image, image_b = load_image(THREE_OBJECTS), load_image(TRIANGLE)
    shown = []
    for backend in (service, remote):
        request_a, _ = run_generation(backend, image, "Describe the image.")
        session = {"request_id": request_a, "image": image}
        with pytest.raises(UserInputError, match="request B is the same as request A"):
            run_compare(backend, session, "  ", None, "", ["relevancy"])
        with pytest.raises(UserInputError, match="choose at least one map"):
            run_compare(backend, session, "", image_b, "", [])
        state = run_compare(backend, session, "", image_b, "", ["attention", "relevancy_vit"])
        assert state["comparison"]["pairs"][state["pair"]]["text"] == "red"  # the first shared content word
        with pytest.raises(UserInputError, match="“yellow” has no matching word in B's answer"):
            select_word(state, "a", 1)
        strip_a, strip_b, summary, rows, tiles, shares = render(backend, select_word(state, "b", 2))
        assert "token 10 of A and token 2 of B" in summary and [row[0] for row in rows] == ["attention",
                                                                                            "relevancy_vit"]
        assert strip_a[10] == ("triangle", "selected") and strip_b[2] == ("triangle", "selected")
        assert len(tiles) == 6 and len(shares.data) == 2
        shown.append((strip_a, strip_b, summary, rows, [np.asarray(tile) for tile in tiles]))
    in_process, over_http = shown
    assert in_process[:4] == over_http[:4]  # strips, summary, numbers
    for here, there in zip(in_process[4], over_http[4]):
        np.testing.assert_array_equal(here, there)
