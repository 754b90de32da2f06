"""What one generation records: attention rows, hidden states and log-probs that equal a teacher-forced replay."""

import pytest
import torch

from lvlm_interpret import Trace
from tests.references import eager_replay


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_captured_rows_equal_eager_attention(family, llava, qwen2_vl, llava_trace, qwen_trace, scene):
    from tests.conftest import make_scene
    loaded, trace, image = (llava, llava_trace, scene) if family == "llava" else \
        (qwen2_vl, qwen_trace, make_scene(200, 90))
    output = eager_replay(loaded, trace)
    for t in range(trace.n_answer):
        source = trace.source_position(t)
        for layer, attentions in enumerate(output.attentions):
            expected = attentions[0, :, source, : source + 1]
            captured = trace.attention[t, layer, :, : source + 1].float()
            assert torch.allclose(captured, expected, atol=2e-3), (t, layer)
            assert not trace.attention[t, layer, :, source + 1:].any()
    logprobs = torch.log_softmax(output.logits[0].float(), -1)
    for t in range(trace.n_answer):
        assert logprobs[trace.source_position(t), trace.answer_ids[t]] == pytest.approx(
            float(trace.answer_logprobs[t]), abs=1e-3)


def test_attention_rows_are_probability_rows(llava_trace, qwen_trace):
    for trace in (llava_trace, qwen_trace):
        rows = trace.attention.float()
        assert (rows >= 0).all()
        assert torch.allclose(rows.sum(-1), torch.ones(rows.shape[:-1]), atol=2e-3)


def test_hidden_states_are_what_the_lm_head_reads(llava, llava_trace, scene):
    output = eager_replay(llava, llava_trace)
    n = llava_trace.hidden.shape[0]
    assert n == llava_trace.prompt_length + llava_trace.n_answer - 1
    logits = llava.family.lm_head(llava.model)(llava_trace.hidden.float())
    assert torch.allclose(logits, output.logits[0, :n].float(), atol=5e-2)


def test_trace_keeps_rows_not_full_prompt_attention(llava_trace):
    trace = llava_trace
    assert trace.attention.shape == (trace.n_answer, trace.n_layers, trace.n_heads,
                                     trace.prompt_length + trace.n_answer - 1)
    assert trace.attention.dtype == torch.float16


def test_trace_round_trips_losslessly(tmp_path, qwen_trace):
    path = qwen_trace.save(tmp_path / "t.safetensors")
    loaded = Trace.load(path)
    for field in ("model_name", "prompt", "answer", "prompt_length", "token_texts", "images", "generation",
                  "special_token_ids"):
        assert getattr(loaded, field) == getattr(qwen_trace, field), field
    for field in ("input_ids", "attention", "hidden", "answer_logprobs"):
        assert torch.equal(getattr(loaded, field), getattr(qwen_trace, field)), field
    assert loaded.model_inputs.keys() == qwen_trace.model_inputs.keys()
    assert all(torch.equal(loaded.model_inputs[k], v) for k, v in qwen_trace.model_inputs.items())
    assert len(loaded.pixels) == 1 and torch.equal(loaded.pixels[0], qwen_trace.pixels[0])
    assert loaded.image(0).size == (200, 90)
    assert loaded.nbytes == qwen_trace.nbytes > qwen_trace.attention.numel() * 2
    assert not list(tmp_path.glob(".trace-*"))  # no temp file left behind


def test_token_texts_are_by_position(llava_trace):
    trace = llava_trace
    assert len(trace.token_texts) == trace.input_ids.shape[0]
    assert trace.answer_ids == trace.input_ids[trace.prompt_length:].tolist()


def test_scoped_hooks_only_see_their_own_context():
    import threading

    from lvlm_interpret.capture import scoped_hook

    layer = torch.nn.Linear(2, 2)
    seen = []
    inside, outside = threading.Event(), threading.Event()

    def other_thread():
        inside.wait(5)
        layer(torch.ones(1, 2))  # runs while the hook is registered, in another context
        outside.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with scoped_hook(layer, lambda module, args, output: seen.append(threading.get_ident())):
        layer(torch.ones(1, 2))
        inside.set()
        outside.wait(5)
    worker.join()
    assert seen == [threading.get_ident()]
