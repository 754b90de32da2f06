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
    for options in (GenerationOptions(max_new_tokens=0), GenerationOptions(temperature=0),
                    GenerationOptions(top_p=1.5)):
        with pytest.raises(UserInputError):
            options.validate()


def test_sampling_is_seeded(llava):
    options = GenerationOptions(max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    first = generate_with_capture(llava, [make_scene()], "Describe the image.", options)
    second = generate_with_capture(llava, [make_scene()], "Describe the image.", options)
    assert first.answer_ids == second.answer_ids
