"""What only a CUDA GPU can check (marker `gpu`; skipped without CUDA; `make gpu-check` runs them): in bfloat16 on
CUDA, capture answers exactly as a plain `generate`, every method gives finite maps, and a request that runs out
of GPU memory gives it back and the next request is served."""

import gc

import numpy as np
import pytest
import torch

from lvlm_interpret import METHODS, ExplainService, GenerationOptions, generate_with_capture, get_method, load_model
from lvlm_interpret.capture import CAPTURE_ATTENTION, build_inputs
from lvlm_interpret.errors import ServiceBusyError
from tests.conftest import make_scene

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"
PROMPT = "Describe the image."
PRESETS = ["llava", "qwen2_vl"]


@pytest.fixture(scope="module")
def bfloat16_models():
    """bfloat16_models(name): the tiny random preset `name` in bfloat16 on the GPU, loaded once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(f"random:{name}", device=DEVICE, dtype="bfloat16")
        return cache[name]
    return get


@pytest.mark.parametrize("preset", PRESETS)
def test_capture_answers_as_plain_generate(bfloat16_models, preset):
    loaded, tokens = bfloat16_models(preset), 12
    trace = generate_with_capture(loaded, [make_scene()], PROMPT,
                                  GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens))
    inputs = build_inputs(loaded, [make_scene()], PROMPT).to(loaded.device)
    loaded.model.set_attn_implementation("sdpa")  # no capture attention at all
    try:
        with torch.no_grad():
            plain = loaded.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                          temperature=None, top_p=None, top_k=None,
                                          pad_token_id=loaded.processor.tokenizer.pad_token_id)
    finally:
        loaded.model.set_attn_implementation(CAPTURE_ATTENTION)
    assert plain[0, trace.prompt_length:].tolist() == trace.answer_ids
    # what capture copied off the GPU (bfloat16 rows and states, stored as float16) is finite
    assert trace.attention.isfinite().all() and trace.hidden.isfinite().all()
    assert trace.answer_logprobs.isfinite().all()


@pytest.mark.parametrize("preset", PRESETS)
def test_every_method_gives_finite_maps(bfloat16_models, preset):
    loaded = bfloat16_models(preset)
    trace = generate_with_capture(loaded, [make_scene()], PROMPT, GenerationOptions(max_new_tokens=4,
                                                                                     min_new_tokens=4))
    for name in sorted(METHODS):
        explanation = get_method(name).explain(trace, trace.n_answer - 1, model=loaded)
        for variant, grids in explanation.all_maps().items():
            for grid, layout in zip(grids, trace.images, strict=True):
                assert grid.shape == (layout.rows, layout.cols), variant
                assert np.isfinite(grid).all() and (grid >= 0).all(), variant
        if explanation.text_scores is not None:
            assert np.isfinite(explanation.text_scores).all(), name


def test_out_of_memory_gives_the_memory_back_and_the_next_request_is_served():
    service = ExplainService(default_model="random:llava", device=DEVICE, dtype="bfloat16")
    options = GenerationOptions(max_new_tokens=6, min_new_tokens=6)
    _, first = service.generate([make_scene()], PROMPT, options=options)  # warm: weights and CUDA workspaces
    gc.collect()
    before = torch.cuda.memory_allocated()
    held, calls = 256 * 2 ** 20, []

    def run_out_of_memory(module, args):
        """Mid-generation, the request holds `held` bytes of the GPU and then asks for far more than it has."""
        calls.append(1)
        if len(calls) == 3:
            kept = torch.empty(held, dtype=torch.uint8, device=DEVICE)  # noqa: F841 (held until the failure)
            torch.empty(2 ** 50, dtype=torch.uint8, device=DEVICE)

    loaded = service.model()
    handle = loaded.family.language_attentions(loaded.model)[0].register_forward_pre_hook(run_out_of_memory)
    try:
        with pytest.raises(ServiceBusyError, match="out of memory"):
            service.generate([make_scene()], PROMPT, options=options)
    finally:
        handle.remove()
    assert len(calls) == 3  # it failed mid-generation, after the prompt and one answer token
    gc.collect()
    assert torch.cuda.memory_allocated() < before + held // 4  # what the failed request held is free again
    _, again = service.generate([make_scene()], PROMPT, options=options)
    assert again.answer_ids == first.answer_ids
