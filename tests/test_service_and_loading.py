import numpy as np
import pytest
import torch

from lvlm_interpret import ExplainService, GenerationOptions, UserInputError, generate_with_capture, load_model
from lvlm_interpret.models.loading import random_presets
from tests.conftest import make_scene


def test_evicted_trace_is_regenerated_transparently():
    service = ExplainService(default_model="random:llava", cache_bytes=1, device="cpu")
    first_id, first = service.generate([make_scene()], "Describe the image.", options=GenerationOptions(4))
    second_id, _ = service.generate([make_scene(100, 100)], "How many shapes are there?",
                                    options=GenerationOptions(4))
    # the cache holds one entry at most: the first trace was evicted, yet explaining it still works
    explanation = service.explain(first_id, "attention", 1)
    regenerated = service.trace(first_id)
    assert torch.equal(regenerated.attention, first.attention)
    np.testing.assert_allclose(explanation.maps[0], service.explain(first_id, "attention", 1).maps[0])
    assert service.trace(second_id).prompt == "How many shapes are there?"
    with pytest.raises(UserInputError, match="unknown or expired"):
        service.trace("nope")


def test_explanations_are_cached_per_options():
    service = ExplainService(default_model="random:llava", device="cpu")
    request_id, _ = service.generate([make_scene()], "Describe the image.", options=GenerationOptions(3))
    a = service.explain(request_id, "attention", 0, layers="0")
    assert service.explain(request_id, "attention", 0, layers="0") is a
    assert service.explain(request_id, "attention", 0, layers="1") is not a


def test_local_checkpoint_loads_through_the_auto_classes(tmp_path, llava):
    llava.model.save_pretrained(tmp_path)
    llava.processor.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    reloaded = load_model(str(tmp_path), device="cpu")
    assert reloaded.family.name == "llava"
    options = GenerationOptions(max_new_tokens=4)
    original = generate_with_capture(llava, [make_scene()], "Describe the image.", options)
    again = generate_with_capture(reloaded, [make_scene()], "Describe the image.", options)
    assert again.answer_ids == original.answer_ids
    assert torch.allclose(again.attention.float(), original.attention.float(), atol=1e-3)


def test_unknown_models_name_what_was_looked_for(tmp_path):
    with pytest.raises(UserInputError, match="random:llava"):
        load_model("random:nope")
    with pytest.raises(UserInputError, match="someone/missing-model"):
        load_model("someone/missing-model")
    assert {"llava", "qwen2_vl"} <= set(random_presets())


def test_bad_generation_options_are_user_errors():
    for options in (GenerationOptions(max_new_tokens=0), GenerationOptions(do_sample=True, temperature=0),
                    GenerationOptions(top_p=1.5)):
        with pytest.raises(UserInputError):
            options.validate()


def test_sampling_is_seeded(llava):
    options = GenerationOptions(max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    first = generate_with_capture(llava, [make_scene()], "Describe the image.", options)
    second = generate_with_capture(llava, [make_scene()], "Describe the image.", options)
    assert first.answer_ids == second.answer_ids


def test_concurrent_requests_do_not_mix_their_captures():
    from concurrent.futures import ThreadPoolExecutor

    service = ExplainService(default_model="random:llava", device="cpu")
    jobs = [(make_scene(160, 96), "Describe the image."), (make_scene(90, 150), "How many shapes are there?")] * 2
    alone = [service.generate([image], prompt, options=GenerationOptions(6))[1] for image, prompt in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda job: service.generate([job[0]], job[1],
                                                              options=GenerationOptions(6))[1], jobs))
    for a, b in zip(alone, together):
        assert a.prompt == b.prompt and torch.equal(a.pixels[0], b.pixels[0])
        assert torch.allclose(a.attention.float(), b.attention.float(), atol=1e-3)
        assert torch.allclose(a.hidden.float(), b.hidden.float(), atol=1e-2)
