"""Which map to believe for a token: faithfulness per map, agreement per pair, the image share, the verdict; the
same from the library, over HTTP and in result.json."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from lvlm_interpret import ExplainService, GenerationOptions
from lvlm_interpret.client import RemoteService
from lvlm_interpret.evaluation.faithfulness import deletion_insertion, deletion_insertion_many
from lvlm_interpret.server import create_api
from lvlm_interpret.trust import agreement, image_share, top_cells, verdict
from tests.conftest import make_scene


@pytest.fixture(scope="module")
def service():
    return ExplainService(default_model="random:llava", device="cpu")


def test_agreement_of_equal_and_of_opposite_maps():
    grid = np.arange(64, dtype=np.float32).reshape(8, 8)
    assert agreement(grid, grid) == {"spearman": 1.0, "top_iou": 1.0}
    opposite = agreement(grid, grid.max() - grid)
    assert opposite["spearman"] == -1.0 and opposite["top_iou"] == 0.0
    assert len(top_cells(grid)) == 7 and top_cells(grid) == set(range(57, 64))  # the top tenth, rounded up
    assert agreement(grid, np.zeros_like(grid))["spearman"] is None  # a flat map has no ranking


def test_image_share_is_relevancys_mass_on_the_image():
    relevancy = SimpleNamespace(maps=[np.full((2, 2), 0.5)], text_scores=np.array([0.0, 1.0, -0.2, 1.0]))
    assert image_share(relevancy) == 0.5  # 2 on the image, 2 on text (negative scores count as none)


def test_verdict_says_when_maps_disagree_when_the_image_barely_matters_and_which_map_is_faithful():
    rows, cols = np.indices((8, 8))
    left, right = -np.hypot(rows, cols), -np.hypot(rows - 6, cols - 7)  # peaks at (0, 0) and (6, 7)
    maps = {"attention": left, "relevancy": right}
    text = verdict("“red”", maps, {"attention": 0.6, "relevancy": 0.1}, {"attention": 0.4, "relevancy": 0.9}, 0.1,
                   0.8)
    assert "barely depends on the image: 10%" in text
    assert "attention and relevancy point at different places (9 cells apart" in text
    assert "the most faithful map is relevancy" in text
    agreeing = verdict("“red”", {"attention": left, "relevancy": left}, {"attention": 0.2, "relevancy": 0.2},
                       {"attention": 0.8, "relevancy": 0.8}, 0.9, 0.01)
    assert "share top cells" in agreeing and "cannot rank the maps" in agreeing and "barely" not in agreeing


def test_batched_curves_equal_one_map_at_a_time(service):
    request_id, trace = service.generate([make_scene()], "Describe the image.", options=GenerationOptions(4))
    loaded = service.model()
    maps = {"a": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.eye(8, dtype=np.float32)}
    together = deletion_insertion_many(loaded, trace, 1, maps, step=0.1)
    for name, grid in maps.items():
        alone = deletion_insertion(loaded, trace, 1, grid, step=0.1)
        np.testing.assert_allclose(together[name]["deletion"], alone["deletion"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(together[name]["insertion"], alone["insertion"], rtol=1e-4, atol=1e-6)


def test_trust_of_a_token_in_process_and_over_http(service):
    request_id, trace = service.generate([make_scene()], "Describe the image.", options=GenerationOptions(4))
    trust = service.trust(request_id, 2)
    maps = set(trust["deletion"])
    assert {"attention", "relevancy", "relevancy_vit", "relevancy_all", "tam", "tam_raw", "tam_cleaned",
            "cleann"} == maps == set(trust["insertion"])
    assert set(trust["agreement"]) == {f"{a}|{b}" for a, b in itertools.combinations(
        [name for name in trust["deletion"]], 2)}
    assert 0 <= trust["image_share"] <= 1 and trust["verdict"].endswith(".")
    assert service.trust(request_id, 2) is trust  # cached
    remote = RemoteService(client=TestClient(create_api(service)))
    remote_id, _ = remote.generate([make_scene()], "Describe the image.", options=GenerationOptions(4))
    assert remote.trust(remote_id, 2) == trust


def test_explain_trust_writes_the_contract(tmp_path):
    import json

    from lvlm_interpret.cli import main

    make_scene().save(tmp_path / "scene.png")
    assert main(["explain", "--image", str(tmp_path / "scene.png"), "--prompt", "Describe the image.", "--model",
                 "random:llava", "--device", "cpu", "--max-new-tokens", "4", "--methods", "attention,tam",
                 "--tokens", "1,3", "--trust", "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "result.json").read_text())
    assert set(record["trust"]) == {"1", "3"}
    entry = record["trust"]["3"]
    assert set(entry["deletion"]) == {"attention", "tam", "tam_raw", "tam_cleaned"}
    assert "attention|tam" in entry["agreement"] and set(entry["agreement"]["attention|tam"]) == {"spearman",
                                                                                                  "top_iou"}
    assert 0 <= entry["image_share"] <= 1 and entry["verdict"]
    assert "trust" in record["timings_s"]
