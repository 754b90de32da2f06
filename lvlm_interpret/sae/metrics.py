"""What an SAE is worth: reconstruction (L0, explained variance, dead features) on held-out activations, and the
spliced-in effect on the model's answers (the hook's activation replaced by the reconstruction, vs clean and vs
mean ablation)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ..analysis.hooks import hooked, run_with_hooks
from ..capture import GenerationOptions, generate_with_capture
from ..demo.scenes import normalise_answer
from .activations import RowHook, image_site

CONDITIONS = ("clean", "sae", "mean_ablated")


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2 over all tokens pooled, in float64 (not a mean of per-token
    ratios)."""
    x, x_hat = x.detach().double(), x_hat.detach().double()
    total = (x - x.mean(0)).pow(2).sum()
    return float(1 - (x - x_hat).pow(2).sum() / total) if float(total) > 0 else float("nan")


@torch.no_grad()
def reconstruction_metrics(sae, activations: torch.Tensor, batch_size: int = 4096) -> dict:
    """L0 (mean active features per token), explained variance, dead fraction (features that never fire on these
    tokens), mean squared error per token."""
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    active, reconstructions = 0.0, []
    for start in range(0, activations.shape[0], batch_size):
        x = activations[start:start + batch_size].float()
        features = sae.encode(x)
        fired |= (features > 0).any(0)
        active += float((features > 0).sum())
        reconstructions.append(sae.decode(features))
    x_hat = torch.cat(reconstructions)
    x = activations.float()
    return {"l0": active / activations.shape[0], "explained_variance": explained_variance(x, x_hat),
            "dead_fraction": float((~fired).float().mean()), "mse": float((x - x_hat).pow(2).sum(-1).mean()),
            "n_tokens": int(activations.shape[0])}


def reconstruct_rows(sae):
    return lambda rows: sae(rows.float())


def replace_rows(value: torch.Tensor):
    return lambda rows: value.to(rows.device, torch.float32).expand(rows.shape[0], -1)


def _answer_nll(loaded, trace, hook=None) -> float:
    """Mean negative log-likelihood per token of the trace's answer, teacher-forced, with the hook active."""
    logits = run_with_hooks(loaded, trace, [] if hook is None else [hook]).logits[0].float()
    sources = torch.tensor([trace.source_position(t) for t in range(trace.n_answer)])
    log_probs = torch.log_softmax(logits[sources], dim=-1)
    return float(-log_probs[torch.arange(trace.n_answer), torch.tensor(trace.answer_ids)].mean())


@torch.no_grad()
def spliced_effect(loaded, sae, hook_name: str, questions: Iterable[tuple], mean: torch.Tensor,
                   max_new_tokens: int = 8) -> dict:
    """Per condition over `questions` ((image, prompt, expected answer or None), ...): `accuracy` (the answer
    equals the expected one, where one is given), `answer_kept` (the answer equals the clean one) and `nll` (the
    clean answer's mean NLL per token, teacher-forced); `loss_recovered` = (nll_mean - nll_sae) /
    (nll_mean - nll_clean), 1 when splicing costs nothing. Both edits act on every token the SAE reads."""
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    edits = {"clean": None, "sae": reconstruct_rows(sae), "mean_ablated": replace_rows(mean)}
    rows = {name: {"correct": [], "kept": [], "nll": []} for name in CONDITIONS}
    for image, prompt, expected in questions:
        clean = generate_with_capture(loaded, [image], prompt, options)
        site = image_site(loaded, hook_name, clean.images)
        for name, edit in edits.items():
            hook = None if edit is None else (hook_name, RowHook(site, edit))
            answer = clean.answer
            if hook is not None:
                with hooked(loaded, [hook]):
                    answer = generate_with_capture(loaded, [image], prompt, options).answer
                hook = (hook_name, RowHook(site, edit))  # a fresh one: a RowHook counts rows over one forward
            rows[name]["kept"].append(normalise_answer(answer) == normalise_answer(clean.answer))
            if expected is not None:
                rows[name]["correct"].append(normalise_answer(answer) == normalise_answer(expected))
            rows[name]["nll"].append(_answer_nll(loaded, clean, hook))
    summary = {"n_questions": len(rows["clean"]["nll"]), "hook_name": hook_name}
    for name, values in rows.items():
        summary[name] = {"accuracy": float(np.mean(values["correct"])) if values["correct"] else None,
                         "answer_kept": float(np.mean(values["kept"])), "nll": float(np.mean(values["nll"]))}
    gap = summary["mean_ablated"]["nll"] - summary["clean"]["nll"]
    # mean ablation that changes nothing: the answer never reads this hook (e.g. a tower layer after the one the
    # projector takes), and the spliced-in figures say nothing
    summary["hook_reaches_answer"] = abs(gap) > 1e-9
    summary["loss_recovered"] = (summary["mean_ablated"]["nll"] - summary["sae"]["nll"]) / gap if gap > 1e-9 \
        else None
    return summary
