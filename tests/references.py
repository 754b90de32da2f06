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


def tower_sources(loaded, inputs, positions):
    """Which tokens of the vision tower's sequence each LM input embedding at `positions` is made of, found by
    gradients rather than from the adapter: (the tower sequence's length, one sorted index list per position).

    The tower's sequence is every vision layer call's tokens in call and batch order; the layer read is the deepest
    whose output reaches the LM inputs (LLaVA's feature layer is the penultimate one)."""
    family, model = loaded.family, loaded.model
    outputs = [[] for _ in family.vision_layers(model)]

    def keep_output(index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            outputs[index].append(hidden)
        return hook

    embeddings = []
    hooks = [layer.register_forward_hook(keep_output(index))
             for index, layer in enumerate(family.vision_layers(model))]
    hooks.append(family.language_layers(model)[0].register_forward_pre_hook(
        lambda module, args, kwargs: embeddings.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True))
    pixel_values = inputs["pixel_values"].clone().requires_grad_(True)  # so every tower output is in the graph
    try:
        with torch.enable_grad():
            model(**{**inputs, "pixel_values": pixel_values})
    finally:
        for hook in hooks:
            hook.remove()
    lm_inputs = embeddings[0][0]  # [S, d]
    probe = torch.randn(lm_inputs.shape[-1], generator=torch.Generator().manual_seed(0))
    whole = torch.autograd.grad((lm_inputs[list(positions)] @ probe).sum(), [t for calls in outputs for t in calls],
                                allow_unused=True, retain_graph=True)
    reached, cursor = [], 0
    for index, calls in enumerate(outputs):
        grads = whole[cursor:cursor + len(calls)]
        cursor += len(calls)
        if any(g is not None and g.abs().sum() > 0 for g in grads):
            reached.append(index)
    layer = outputs[reached[-1]]
    size = sum(t.reshape(-1, t.shape[-1]).shape[0] for t in layer)
    sources = []
    for position in positions:
        grads = torch.autograd.grad(lm_inputs[position] @ probe, layer, allow_unused=True, retain_graph=True)
        flat = torch.cat([torch.zeros(t.reshape(-1, t.shape[-1]).shape[0]) if g is None else
                          g.reshape(-1, g.shape[-1]).abs().sum(-1) for g, t in zip(grads, layer)])
        sources.append(flat.nonzero().flatten().tolist())
    return size, sources
