"""Seeded sampling belongs to its request: the same seed gives the same answer alone or beside other requests,
and an evicted trace is regenerated only when it reproduces the answer it explains."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from lvlm_interpret import ExplainService, GenerationOptions
from lvlm_interpret.errors import UnknownRequestError
from lvlm_interpret.server import Admission, create_api
from tests.conftest import make_scene
from tests.test_server import _png

SAMPLED = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=1.0)


@pytest.fixture(scope="module")
def service():
    return ExplainService(default_model="random:llava", device="cpu")


def test_the_same_seed_gives_the_same_answer_under_concurrent_requests(service):
    http = TestClient(create_api(service, admission=Admission(concurrency=4, queue=16)))
    png = _png(make_scene())

    def answer(seed: int) -> list[int]:
        response = http.post("/v1/generate", files={"image": ("s.png", png, "image/png")}, data={
            "prompt": "Describe the image.", "max_new_tokens": "8", "temperature": "1.5", "seed": str(seed)})
        assert response.status_code == 200, response.text
        return response.json()["answer_ids"]

    alone = {seed: answer(seed) for seed in range(6)}
    assert len({tuple(ids) for ids in alone.values()}) > 1  # the seeds do sample different answers
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(answer, [seed for seed in range(6) for _ in range(2)]))
    assert together == [alone[seed] for seed in range(6) for _ in range(2)]


def test_sampling_leaves_the_process_random_state_alone(service):
    import torch

    before = torch.random.get_rng_state()
    service.generate([make_scene()], "Describe the image.", options=GenerationOptions(**SAMPLED, seed=3))
    assert torch.equal(torch.random.get_rng_state(), before)


def test_an_evicted_sampled_trace_is_regenerated_with_its_answer():
    service = ExplainService(default_model="random:llava", device="cpu", cache_bytes=1)
    request_id, trace = service.generate([make_scene()], "Describe the image.",
                                         options=GenerationOptions(**SAMPLED, seed=11))
    service.generate([make_scene(120, 120)], "Describe the image.", options=GenerationOptions(max_new_tokens=3))
    assert service.trace(request_id).answer_ids == trace.answer_ids  # evicted, then regenerated alike
    explanation = service.explain(request_id, "attention", trace.n_answer - 1)
    assert explanation.maps[0].shape == (8, 8)


def test_a_regenerated_trace_with_another_answer_is_refused():
    service = ExplainService(default_model="random:llava", device="cpu", cache_bytes=1)
    request_id, trace = service.generate([make_scene()], "Describe the image.",
                                         options=GenerationOptions(max_new_tokens=4))
    service.generate([make_scene(120, 120)], "Describe the image.", options=GenerationOptions(max_new_tokens=3))
    request = service.request(request_id)
    # as if the weights had changed since: the recorded answer is not what the model now gives
    service._requests.put(request_id, replace(request, answer_ids=tuple(reversed(trace.answer_ids)) + (0,)), 1)
    with pytest.raises(UnknownRequestError, match="could not be reproduced .* generate the answer again"):
        service.explain(request_id, "tam", 0)
