"""Independent reference computations the tests compare the product against (transformers' own eager attention)."""

import torch

from lvlm_interpret.capture import CAPTURE_ATTENTION, replay_inputs


def eager_replay(loaded, trace):
    """Eager teacher-forced forward over the final sequence: the reference the capture must match."""
    loaded.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return loaded.model(**replay_inputs(trace), output_attentions=True, output_hidden_states=True)
    finally:
        loaded.model.set_attn_implementation(CAPTURE_ATTENTION)


def reference_lm_map(loaded, trace, t):
    """Chefer's rule with the full R, on HF's own eager attention and a plain backward of the raw logit."""
    loaded.model.set_attn_implementation("eager")
    try:
        output = loaded.model(**replay_inputs(trace), output_attentions=True)
        source = trace.source_position(t)
        target = output.logits[0, source, trace.answer_ids[t]]
        attentions = output.attentions[-loaded.model.config.get_text_config().num_hidden_layers:]
        grads = torch.autograd.grad(target, attentions)
    finally:
        loaded.model.set_attn_implementation(CAPTURE_ATTENTION)
    size = attentions[0].shape[-1]
    relevance = torch.eye(size)
    for gradient, attention in zip(grads, attentions):
        abar = torch.relu(gradient[0] * attention[0]).mean(0).detach()
        relevance = relevance + abar @ relevance
    layout = trace.images[0]
    return layout.gather(relevance[source].numpy()), float(target.detach())
