"""iGOS++ heatmaps for open-ended answers (Xing et al. 2025, on iGOS++ by Khorram et al. 2021).

A mask M over the image (1 = keep, 0 = perturb) is optimised so that perturbing where M is low removes the
explained tokens' evidence: with x the image's pixel inputs, B those of the baseline image (`baseline_image`:
section 5's blurred copy in the paper) and S the tokens' summed log-probability (teacher-forced, fp32
log_softmax), the deletion term D = mean_a S(B + aM (x - B) + e) and the insertion term
I = mean_a S(B + (1 - aM)(x - B) + e) over integration points a = 1/n .. 1 and seeded noise e; their autograd
is the integrated gradient. Minimised: (D - I) / gap + area mean(1 - M) + smoothness BTV(M)
+ pull_i mean((1 - M)^2), by Nesterov steps with M clamped to [0, 1]; `gap` = S(x) - S(B) (at least 1 nat) makes
the data term the same scale for every model and token. The saliency is 1 - M, with cells of equal M (most stay
at 1) ordered by the last iteration's integrated gradient (at most TIE_BREAK added): the deletion order and the
highest cell then carry information where the mask does not.

Differences from the authors' code (reference/methods.md section 8): M lives on the adapter's image-token grid
(or a finer one) over the map's box, and reaches the model's pixel inputs through a map measured from the family's
own processor (black, white and coordinate-ramp images), so every family, tiled or not, gets the same M; the
integration points of every mask (one per token, optimised together) run in chunked forwards whose backward
gives the gradient w.r.t. M only; the baseline's inputs and the pixel map are computed once per trace; masks stop
when their largest change falls under a tolerance; the baseline may also turn the hues (a blurred solid shape keeps
its colour, so the blur alone leaves colour words nothing to find). Only the first image is masked.
"""

from __future__ import annotations

import inspect
import math
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..capture import replay_inputs
from ..errors import UserInputError
from ..progress import current_reporter
from ..trace import Trace
from .base import Explanation, ExplanationMethod, register_method
from .visual_relevance import (VisualRelevance, _image_inputs, answer_logprobs_batch, blurred, relevant_against,
                                visually_relevant_tokens)

TIE_BREAK = 1e-3  # the most the final integrated gradient adds to a cell's saliency (under any step of the mask)


BASELINES = ("auto", "blur", "hue_blur", "hue", "grey", "mean")  # what a mask's low cells show; see `baseline_image`
AUTO_CANDIDATES = ("blur", "hue")  # "auto": per mask, the one that lowers its tokens' log-probability most


def baseline_kinds(baseline: str) -> tuple[str, ...]:
    """The baseline images an option value may give a mask."""
    return AUTO_CANDIDATES if baseline == "auto" else (baseline,)
HUE_SHIFT = 1 / 3  # of the colour circle: red -> green -> blue -> red, so every named colour becomes another


def baseline_image(image: Image.Image, kind: str) -> Image.Image:
    """What the masked-out image shows: "blur" the paper's blurred copy (section 5: removes shapes and texture,
    keeps a solid shape's colour), "hue" the image with every hue turned by a third of the circle (keeps shapes
    and brightness, changes every colour), "hue_blur" the blurred copy of that (removes both), "grey" mid grey
    (128), "mean" the image's mean colour."""
    if kind in ("hue", "hue_blur"):
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + round(256 * HUE_SHIFT)) % 256
        turned = Image.fromarray(hsv, mode="HSV").convert("RGB")
        return blurred(turned) if kind == "hue_blur" else turned
    if kind == "blur":
        return blurred(image)
    colour = (128,) * 3 if kind == "grey" else \
        tuple(int(v) for v in np.asarray(image.convert("RGB"), dtype=np.float64).mean((0, 1)).round())
    return Image.new("RGB", image.size, colour)


@dataclass
class _PixelMap:
    """How the first image's mask reaches one floating model input: where the element shows the first image, its
    place in the map's box (grid_sample coordinates in [-1, 1])."""

    original: torch.Tensor  # the trace's input, float32
    inside: torch.Tensor  # bool, same shape: elements that show the first image
    coordinates: torch.Tensor  # [n_inside, 2] (x, y) in the box, grid_sample's convention


@dataclass
class _Perturbation:
    """One baseline's model inputs (by input name, float32) and every answer token's log-probability with it."""

    inputs: dict[str, torch.Tensor]
    logprob: list[float]


@dataclass
class _Shared:
    """What every igos call on one trace shares: the pixel maps, each baseline's inputs (made when first asked
    for), the colours of the box (for the bilateral TV) and the visually relevant tokens (LLR against the blur)."""

    pixels: dict[str, _PixelMap]
    box_image: Image.Image
    relevance: VisualRelevance
    perturbations: dict[str, _Perturbation]

    def perturbation(self, loaded, trace: Trace, kind: str) -> _Perturbation:
        if kind not in self.perturbations:
            image = baseline_image(trace.image(0), kind)
            inputs = {name: value for name, value in floating_inputs(loaded, trace, image).items()
                      if name in self.pixels}
            if kind == "blur" and len(trace.images) == 1:
                logprob = self.relevance.logprob_blurred  # the same images: no forward
            else:
                others = [trace.image(k) for k in range(1, len(trace.images))]
                logprob = answer_logprobs_batch(loaded, trace, [[image, *others]])[0].tolist()
            self.perturbations[kind] = _Perturbation(inputs, logprob)
        return self.perturbations[kind]


def floating_inputs(loaded, trace: Trace, first_image: Image.Image) -> dict[str, torch.Tensor]:
    images = [first_image] + [trace.image(k) for k in range(1, len(trace.images))]
    return {name: value.float() for name, value in _image_inputs(loaded, trace, images).items()
            if value.is_floating_point()}


def _ramp(size: tuple[int, int], axis: int) -> Image.Image:
    """A grey ramp from 0 to 255 along `axis` (0: x, 1: y) of an image of `size` (width, height)."""
    width, height = size
    length = width if axis == 0 else height
    values = np.round(np.linspace(0, 255, length)).astype(np.uint8)
    plane = np.broadcast_to(values[None, :] if axis == 0 else values[:, None], (height, width))
    return Image.fromarray(np.repeat(plane[..., None], 3, axis=2).copy(), mode="RGB")


def pixel_maps(loaded, trace: Trace) -> dict[str, _PixelMap]:
    """Every processed input's elements placed on the first image: the family's processor turns a black, a white
    and two ramp images into its inputs, and (ramp - black) / (white - black) reads, per element, where in the
    image it was sampled (the processor's resizing, tiling and normalisation are affine per element). Elements that
    do not change between black and white show padding or another image."""
    size = trace.images[0].image_size
    black, white = (Image.new("RGB", size, (value,) * 3) for value in (0, 255))
    processed = [floating_inputs(loaded, trace, image) for image in (black, white, _ramp(size, 0), _ramp(size, 1))]
    ramp_names = set(processed[0])
    x0, y0, x1, y1 = trace.images[0].box
    maps = {}
    for name, original in trace.model_inputs.items():
        if name not in ramp_names:
            continue
        low, high, ramp_x, ramp_y = (inputs[name] for inputs in processed)
        if not low.shape == high.shape == original.shape:
            raise UserInputError(f"igos: the processor gives {name} another shape for images of the same size; "
                                 "this model's inputs cannot be masked")
        span = high - low
        inside = span.abs() > 1e-4 * span.abs().max().clamp_min(1e-12)
        # pixel centres of the ramps' columns and rows, then the box's grid_sample coordinates
        x = ((ramp_x - low)[inside] / span[inside]).clamp(0, 1) * (size[0] - 1) + 0.5
        y = ((ramp_y - low)[inside] / span[inside]).clamp(0, 1) * (size[1] - 1) + 0.5
        coordinates = torch.stack([2 * (x - x0) / (x1 - x0) - 1, 2 * (y - y0) / (y1 - y0) - 1], dim=-1)
        maps[name] = _PixelMap(original.float(), inside, coordinates)
    if not maps:
        raise UserInputError("igos: the model takes no pixel input it could mask")
    return maps


class _SharedCache:
    """The most recently explained trace's `_Shared`, let go with the trace."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entry = None  # (weak reference to the trace, weak reference to the model, shared)

    def get(self, loaded, trace: Trace) -> _Shared:
        with self._lock:
            entry = self._entry
            if entry is None or entry[0]() is not trace or entry[1]() is not loaded.model:
                x0, y0, x1, y1 = trace.images[0].box
                box_image = trace.image(0).crop((round(x0), round(y0), round(x1), round(y1)))
                shared = _Shared(pixel_maps(loaded, trace), box_image, visually_relevant_tokens(loaded, trace), {})
                entry = (weakref.ref(trace), weakref.ref(loaded.model), shared)
                self._entry = entry
            return entry[2]


_SHARED = _SharedCache()


def mask_shape(rows: int, cols: int, mask_size: int | None) -> tuple[int, int]:
    """The mask's (rows, cols): the token grid, or `mask_size` cells along the grid's longer side."""
    if mask_size is None:
        return rows, cols
    scale = mask_size / max(rows, cols)
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def _cell_colours(box_image: Image.Image, shape: tuple[int, int]) -> torch.Tensor:
    """[3, rows, cols] mean colour of each mask cell, in [0, 1]."""
    small = box_image.convert("RGB").resize((shape[1], shape[0]), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)


def bilateral_tv(masks: torch.Tensor, colours: torch.Tensor, sigma2: float = 0.01) -> torch.Tensor:
    """Per mask [n, rows, cols]: half the mean squared difference between neighbouring cells, plus half the same
    weighted by exp(-(colour difference)^2 / sigma2) (colour difference: mean over channels of the squared
    difference), so the mask may change where the image does."""
    totals = []
    for axis in (1, 2):
        step = masks.diff(dim=axis) ** 2
        weight = torch.exp(-(colours.diff(dim=axis) ** 2).mean(0) / sigma2)
        totals.append(0.5 * (step.flatten(1).mean(1) + (step * weight).flatten(1).mean(1)))
    return totals[0] + totals[1]


@dataclass
class IgosResult:
    """The optimised masks: `saliency` [n, rows, cols] = 1 - M at the mask's resolution (plus the tie-break,
    at most TIE_BREAK), per mask the iterations it ran, its objective after each and the baseline it used."""

    saliency: np.ndarray
    iterations: list[int]
    objective: list[list[float]]
    baselines: list[str]


def optimise_masks(loaded, trace: Trace, token_sets: list[list[int]], iterations: int = 5,
                   mask_size: int | None = None, ig_steps: int = 5, lr: float = 0.2, momentum: float = 3.0,
                   area: float = 1.0, smoothness: float = 10.0, pull: float = 1.0, pull_decay: float = 1.0,
                   noise: float = 0.05, tolerance: float = 0.002, seed: int = 0, chunk_size: int = 16,
                   baseline: str = "auto") -> IgosResult:
    """One mask per set of answer tokens (each scored by the tokens' summed log-probability), optimised together;
    low cells show `baseline_image(image, baseline)`, for "auto" each mask's choice of AUTO_CANDIDATES."""
    layout = trace.images[0]
    shape = mask_shape(layout.rows, layout.cols, mask_size)
    shared = _SHARED.get(loaded, trace)
    colours = _cell_colours(shared.box_image, shape)
    n_masks, n_answer = len(token_sets), trace.n_answer
    weights = torch.zeros(n_masks, n_answer)
    for j, tokens in enumerate(token_sets):
        weights[j, tokens] = 1.0
    kinds = baseline_kinds(baseline)
    perturbations = [shared.perturbation(loaded, trace, kind) for kind in kinds]
    logprob_image = torch.tensor(shared.relevance.logprob_image)
    gap, kind_of = torch.stack([weights @ (logprob_image - torch.tensor(p.logprob)) for p in perturbations]).max(0)
    scale = 1.0 / gap.clamp_min(1.0)
    perturbed = {name: torch.stack([p.inputs[name][pixel_map.inside] for p in perturbations])
                 for name, pixel_map in shared.pixels.items()}
    points = torch.arange(1, ig_steps + 1, dtype=torch.float32) / ig_steps
    # rows of one mask: deletion at each point, then insertion at each point
    row_points = torch.cat([points, points])
    row_insertion = torch.cat([torch.zeros(ig_steps, dtype=torch.bool), torch.ones(ig_steps, dtype=torch.bool)])
    generator = torch.Generator().manual_seed(seed)
    base_inputs = replay_inputs(trace)
    needed = sorted({t for tokens in token_sets for t in tokens})
    sources = torch.tensor([trace.prompt_length - 1 + t for t in needed])
    targets = torch.tensor([trace.answer_ids[t] for t in needed])
    weights = weights[:, needed]

    masks = torch.ones(n_masks, *shape)
    previous = masks.clone()
    active = torch.ones(n_masks, dtype=torch.bool)
    ran = [0] * n_masks
    history: list[list[float]] = [[] for _ in range(n_masks)]
    evidence = torch.zeros(n_masks, *shape)  # each mask's last data gradient: > 0 where the image is evidence
    report = current_reporter()  # after each iteration: a progress bar, a Cancel that raises
    for i in range(1, iterations + 1):
        chosen = active.nonzero().flatten()
        shared_noise = {name: torch.randn((2 * ig_steps, int(m.inside.sum())), generator=generator) * noise
                        for name, m in shared.pixels.items()}
        variable = masks[chosen].clone().requires_grad_(True)
        data, gradient = _data_term(loaded, trace, shared.pixels, perturbed, kind_of[chosen], base_inputs, variable,
                                    row_points, row_insertion, shared_noise, sources, targets, weights[chosen],
                                    scale[chosen], chunk_size)
        evidence[chosen] = gradient.clamp_min(0)
        with torch.enable_grad():
            pull_now = pull * math.exp(-pull_decay * (i - 1))
            penalty = (area * (1 - variable).flatten(1).mean(1) + smoothness * bilateral_tv(variable, colours)
                       + pull_now * ((1 - variable) ** 2).flatten(1).mean(1))
            gradient = gradient + torch.autograd.grad(penalty.sum(), variable)[0]
        objective = data + penalty.detach()
        # normalised steps: lr is how far the most sensitive cell moves, whatever the model's or the mask's scale
        theta = variable.detach() - lr * gradient / gradient.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None]
        updated = (theta + (i / (i + momentum)) * (theta - previous[chosen])).clamp(0, 1)
        change = (updated - masks[chosen]).abs().flatten(1).amax(1)
        previous[chosen] = theta
        masks[chosen] = updated
        for k, j in enumerate(chosen.tolist()):
            ran[j] = i
            history[j].append(round(float(objective[k]), 6))
            if change[k] < tolerance:
                active[j] = False
        if report is not None:
            report(i, iterations)
        if not active.any():
            break
    # cells the mask leaves equal (most stay at 1) are ordered by their evidence; only cells whose masks differ by
    # less than TIE_BREAK can swap
    tie_break = TIE_BREAK * evidence / evidence.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    saliency = 1 - masks + tie_break
    return IgosResult(saliency=saliency.numpy().astype(np.float32), iterations=ran, objective=history,
                      baselines=[kinds[k] for k in kind_of.tolist()])


def _data_term(loaded, trace, pixels, perturbed, kind_of, base_inputs, masks, row_points, row_insertion, noise, sources,
               targets, weights, scale, chunk_size):
    """(D - I) / gap per mask and its gradient w.r.t. the masks: every mask's integration rows in chunks of
    `chunk_size` forwards, each chunk's backward adding to the gradient. `perturbed[name]` [n_baselines, n_inside]:
    the baselines' elements that show the image; mask k uses baseline kind_of[k]."""
    n_masks, per_mask = masks.shape[0], row_points.shape[0]
    gradient = torch.zeros_like(masks)
    totals = torch.zeros(n_masks)
    sign = torch.where(row_insertion, -1.0, 1.0) / (per_mask // 2)
    device = loaded.device
    for start in range(0, n_masks * per_mask, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, n_masks * per_mask))
        mask_of, point_of = rows // per_mask, rows % per_mask
        with torch.enable_grad():
            inputs = {name: torch.cat([value] * len(rows)).to(device) for name, value in base_inputs.items()
                      if name not in pixels}
            for name, pixel_map in pixels.items():
                coordinates = pixel_map.coordinates[None, None].expand(len(rows), -1, -1, -1)
                keep = F.grid_sample(masks[mask_of, None], coordinates, mode="bilinear", padding_mode="border",
                                     align_corners=False)[:, 0, 0] * row_points[point_of, None]
                keep = torch.where(row_insertion[point_of, None], 1 - keep, keep)
                low = perturbed[name][kind_of[mask_of]]
                batch = pixel_map.original.expand(len(rows), *pixel_map.original.shape).clone()
                batch[:, pixel_map.inside] = low + keep * (pixel_map.original[pixel_map.inside] - low) \
                    + noise[name][point_of]
                inputs[name] = batch.reshape(-1, *pixel_map.original.shape[1:]).to(device, base_inputs[name].dtype)
            logits = loaded.model(**inputs, logits_to_keep=sources.to(device)).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)[:, torch.arange(len(targets)), targets.to(device)].cpu()
            scores = (logprobs * weights[mask_of]).sum(-1) * sign[point_of] * scale[mask_of]
            totals.index_add_(0, mask_of, scores.detach())
            gradient += torch.autograd.grad(scores.sum(), masks)[0]
    return totals, gradient


def answer_tokens(trace: Trace, relevance: VisualRelevance, perturbations: dict[str, _Perturbation]) -> tuple[list[int], str]:
    """The tokens of the answer-level mask: the visually relevant ones (LLR against the blur, the seed's), with the
    tokens the mask's other baselines remove as clearly (a colour the blur keeps), or (none) the one of highest
    LLR."""
    relevant = list(relevance.relevant)
    others = [kind for kind in perturbations if kind != "blur"]
    for kind in others:
        relevant = [a or b for a, b in zip(relevant, relevant_against(trace, relevance.logprob_image,
                                                                       perturbations[kind].logprob))]
    tokens = [t for t, keep in enumerate(relevant) if keep]
    against = " or ".join(["the blur", *others])
    if tokens:
        return tokens, f"visually relevant tokens (LLR against {against})"
    return [int(np.argmax(relevance.llr))], f"no visually relevant token (LLR against {against}): the token of " \
                                            "highest LLR against the blur"


def answer_summary(loaded, trace: Trace, answer: Explanation) -> dict:
    """result.json's "igos": the answer-level mask's tokens, resolution and iterations, and its deletion /
    insertion AUCs on those tokens' mean probability (methods.md section 6)."""
    from ..evaluation.faithfulness import deletion_insertion  # here: the evaluation package imports the methods

    curves = deletion_insertion(loaded, trace, answer.details["tokens"], answer.maps[0])
    return {"tokens": answer.details["tokens"], "chosen_by": answer.details["chosen_by"],
            "mask_size": answer.details["mask_size"], "iterations": answer.details["iterations"],
            "baseline": answer.details["baseline"],
            "deletion_auc": round(curves["deletion_auc"], 6), "insertion_auc": round(curves["insertion_auc"], 6),
            "seed": answer.details["seed"]}


def to_grid(saliency: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[n, rows, cols]: each token cell's mean saliency (the mask averaged over the cells it covers)."""
    return F.adaptive_avg_pool2d(torch.from_numpy(saliency)[:, None], (rows, cols))[:, 0].numpy().astype(np.float32)


@register_method
class Igos(ExplanationMethod):
    name = "igos"
    description = "iGOS++: a mask optimised by integrated gradients of deletion and insertion, smooth and small " \
                  "(Xing et al. 2025); slow, it runs the model many times."
    slow = True

    def explain(self, trace, token_index, model=None, **options):
        return self.explain_many(trace, [token_index], model=model, **options)[0]

    def explain_many(self, trace, token_indices, model=None, iterations: int = 5, mask_size: int | None = None,
                     ig_steps: int = 5, lr: float = 0.2, momentum: float = 3.0, area: float = 1.0,
                     smoothness: float = 10.0, pull: float = 1.0, pull_decay: float = 1.0, noise: float = 0.05,
                     tolerance: float = 0.002, seed: int = 0, chunk_size: int = 16, baseline: str = "auto"):
        """One mask per token, optimised together (see `optimise_masks`)."""
        options = _checked(model, iterations, mask_size, ig_steps, lr, momentum, area, smoothness, pull, pull_decay,
                           noise, tolerance, seed, chunk_size, baseline)
        for t in token_indices:
            trace.check_token_index(t)
        token_indices = list(token_indices)
        result = optimise_masks(model, trace, [[t] for t in token_indices], **options)
        return [self._explanation(trace, t, result, k, options, [t]) for k, t in enumerate(token_indices)]

    def explain_answer(self, trace, model=None, **options) -> Explanation:
        """One mask for the answer's visually relevant tokens together (`igos_answer`); token_index is the first of
        them."""
        self.check_options(options)
        options = _checked(model, **{**_defaults(self.explain_many), **options})
        shared = _SHARED.get(model, trace)
        tokens, chosen_by = answer_tokens(trace, shared.relevance, {
            kind: shared.perturbation(model, trace, kind) for kind in baseline_kinds(options["baseline"])})
        result = optimise_masks(model, trace, [tokens], **options)
        explanation = self._explanation(trace, tokens[0], result, 0, options, tokens)
        explanation.method = "igos_answer"
        explanation.details["chosen_by"] = chosen_by
        return explanation

    def _explanation(self, trace, token_index, result: IgosResult, k: int, options: dict, tokens: list[int]):
        layout = trace.images[0]
        fine = result.saliency[k]
        grid = to_grid(fine[None], layout.rows, layout.cols)[0]
        others = [np.zeros((layout.rows, layout.cols), dtype=np.float32) for layout in trace.images[1:]]
        return Explanation(method=self.name, token_index=token_index, maps=[grid, *others], details={
            "tokens": tokens, "fine_map": fine, "mask_size": list(fine.shape), "iterations": result.iterations[k],
            "objective": result.objective[k], "baseline": result.baselines[k], "seed": options["seed"],
            "options": options})


def _defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty and name != "model"}


def _checked(model, iterations, mask_size, ig_steps, lr, momentum, area, smoothness, pull, pull_decay, noise,
             tolerance, seed, chunk_size, baseline) -> dict:
    if model is None:
        raise UserInputError("igos needs the model that generated the trace")
    if baseline not in BASELINES:
        raise UserInputError(f"igos: baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    for name, value, low in (("iterations", iterations, 1), ("ig_steps", ig_steps, 1), ("chunk_size", chunk_size, 1),
                             ("seed", seed, 0)):
        if value < low:
            raise UserInputError(f"igos: {name} must be at least {low}, got {value}")
    if mask_size is not None and not 1 <= mask_size <= 256:
        raise UserInputError(f"igos: mask_size must be between 1 and 256 cells (or null: the token grid), "
                             f"got {mask_size}")
    for name, value in (("lr", lr), ("area", area), ("smoothness", smoothness), ("pull", pull),
                        ("pull_decay", pull_decay), ("noise", noise), ("tolerance", tolerance), ("momentum", momentum)):
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            raise UserInputError(f"igos: {name} must be a {'positive' if name == 'lr' else 'non-negative'} number, "
                                 f"got {value}")
    return {"iterations": iterations, "mask_size": mask_size, "ig_steps": ig_steps, "lr": lr, "momentum": momentum,
            "area": area, "smoothness": smoothness, "pull": pull, "pull_decay": pull_decay, "noise": noise,
            "tolerance": tolerance, "seed": seed, "chunk_size": chunk_size, "baseline": baseline}
