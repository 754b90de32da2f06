"""Speed and size figures: plain generation, generation with capture, each method per token and for all tokens."""

from __future__ import annotations

import resource
import statistics
import time

import torch

from .capture import CAPTURE_ATTENTION, GenerationOptions, generate_with_capture, replay_inputs
from .demo.scenes import DESCRIBE_PROMPT, draw_scene
from .methods import get_method


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _timed(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run_bench(loaded, answer_tokens: int = 16, methods=("attention", "tam", "relevancy", "cleann"),
              repeats: int = 3, image_size: int = 192) -> dict:
    image = draw_scene(10 ** 9, image_size).image
    options = GenerationOptions(max_new_tokens=answer_tokens, min_new_tokens=answer_tokens)
    model = loaded.model

    def plain():
        inputs = loaded.processor(images=[image], text=_chat(loaded), return_tensors="pt").to(loaded.device)
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=answer_tokens, min_new_tokens=answer_tokens,
                                  do_sample=False, temperature=None, top_p=None, top_k=None,
                                  pad_token_id=loaded.processor.tokenizer.pad_token_id)

    model.set_attn_implementation("sdpa")
    try:
        plain()  # warm-up
        plain_s, _ = _timed(plain, repeats)
    finally:
        model.set_attn_implementation(CAPTURE_ATTENTION)
    capture_s, trace = _timed(lambda: generate_with_capture(loaded, [image], DESCRIBE_PROMPT, options), repeats)
    figures = {"model": loaded.name, "device": str(loaded.device), "answer_tokens": trace.n_answer,
               "prompt_tokens": trace.prompt_length, "plain_generation_s": plain_s,
               "capture_generation_s": capture_s, "capture_overhead_x": capture_s / plain_s,
               "trace_bytes": trace.nbytes, "methods": {}}
    all_tokens = list(range(trace.n_answer))

    def forward_backward():
        """The yardstick for one token's relevancy: a plain (SDPA) forward over the final sequence and the backward
        of one answer token's logit through the whole model to the input pixels (activation gradients only, as
        any attribution needs; no weight gradients)."""
        inputs = replay_inputs(trace, loaded.device)
        inputs["pixel_values"] = inputs["pixel_values"].clone().requires_grad_()
        model.set_attn_implementation("sdpa")
        try:
            with torch.enable_grad():
                logits = model(**inputs).logits[0]
                target = logits[trace.source_position(trace.n_answer // 2), trace.answer_ids[trace.n_answer // 2]]
                torch.autograd.grad(target, inputs["pixel_values"])
        finally:
            model.set_attn_implementation(CAPTURE_ATTENTION)

    figures["forward_backward_s"], _ = _timed(forward_backward, repeats)
    for name in methods:
        method = get_method(name)
        one_s, _ = _timed(lambda: method.explain(trace, trace.n_answer // 2, model=loaded), repeats)
        row = {"one_token_s": one_s, "one_token_x_plain": one_s / plain_s,
               "one_token_x_forward_backward": one_s / figures["forward_backward_s"]}
        if name != "cleann":  # CLEANN is a per-click search, not run over whole answers
            all_s, _ = _timed(lambda: method.explain_many(trace, all_tokens, model=loaded), repeats)
            row.update({"all_tokens_s": all_s, "all_tokens_x_plain": all_s / plain_s})
        figures["methods"][name] = row
    if name := next((m for m in methods if m == "relevancy"), None):
        sequential_s, _ = _timed(lambda: [get_method(name).explain(trace, t, model=loaded) for t in all_tokens], 1)
        figures["methods"][name]["all_tokens_one_at_a_time_s"] = sequential_s
        figures["methods"][name]["batched_speedup_x"] = sequential_s / figures["methods"][name]["all_tokens_s"]
    figures["peak_memory_mb"] = _peak_memory_mb(loaded.device)
    return figures


def _chat(loaded) -> str:
    content = [{"type": "image"}, {"type": "text", "text": DESCRIBE_PROMPT}]
    return loaded.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                tokenize=False)
