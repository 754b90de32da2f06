"""Train the embedded demo models on synthetic scenes: `demo` (a small LlavaForConditionalGeneration) and
`demo-qwen2_vl` (a small Qwen2VLForConditionalGeneration), with the same data, recipe and code.

    python -m lvlm_interpret.demo.train [--family llava|qwen2_vl] [--out DIR] [--resume] [--minutes N]

Recipe (see assets/demo-model/README.md for the reasons):
- every training example is one image followed by several *independent* single-turn questions: the image
  prefix is computed once and each question-answer branch attends to the prefix and to itself only (a tree
  attention mask, positions restarting after the prefix), so a batch of B images trains ~10 B single-turn
  examples that are exactly what the product sends, at the cost of one image prefix each;
- an auxiliary per-patch head on the projector output classifies each visual token's colour and shape with
  cosine logits against the decoder's own word embeddings of those words (plus a left-to-right rank head);
- attention supervision: in one decoder layer, three heads are trained to attend, from the position that emits
  the answer, to the object(s) the question names (head 0: the answer's object; head 1: objects of the named
  colour; head 2: objects of the named shape); for "Describe the image." head 0 attends to the object whose
  words are being written. This hands the decoder the question-conditioned retrieval circuit that plain
  next-token loss finds only slowly, and makes that layer's attention maps point at the right object.
The auxiliary heads are training-only: the saved model is a plain LlavaForConditionalGeneration or
Qwen2VLForConditionalGeneration.

The families differ only in how an image becomes LM tokens (`FAMILIES`): LLaVA squashes every image to 96 x 96 and
gives 12 x 12 tokens with 1D positions; Qwen2-VL keeps the aspect ratio at about 144 merged tokens (8 px patches,
2 x 2 merged: 12 x 12 on a square image) and gives them M-RoPE positions (t, h, w) = start + (0, row, column), the
text after the image continuing at start + max(rows, columns); a branch's positions restart there on all 3 rows.

Training scenes use seeds < 10**9 (scene i of step s has seed s * batch + i); held-out scenes use 10**9 + i.
Checkpoints (model, auxiliary heads, optimizer, step, elapsed time) go to --ckpt every --ckpt-minutes; a
killed run continues exactly with --resume. The model is written to --out whenever held-out accuracy improves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor, Qwen2VLForConditionalGeneration

from ..families.llava import CHAT_TEMPLATE, IMAGE_TOKEN, llava_config, llava_processor
from ..families.qwen2_vl import Qwen2VLFamily
from ..models.word_tokenizer import COMMON_WORDS, build_word_tokenizer
from .scenes import (
    COLOURS, HELD_OUT_SEED_START, KINDS, SHAPES, Scene, draw_scene, parse_prompt, sample_questions,
)

IMAGE_SIZE, PATCH = 96, 8
GRID = IMAGE_SIZE // PATCH
EXTRA_WORDS = ["user", "assistant", "shapes", "colour"]

MODEL_PRESET = {
    "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4},
    "text": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 8, "max_position_embeddings": 512},
}
# The same sizes on Qwen2-VL's layout (a preset of Qwen2VLFamily.build_random): 8 px patches merged 2 x 2 into one
# LM token, every image resized (aspect kept) to about 144 merged cells; head_dim 32 split 4 / 6 / 6 over (t, h, w)
QWEN2_VL_PRESET = {
    "image": {"patch": 8, "merge": 2, "min_cells": 144, "max_cells": 144},
    "vision_config": {"depth": 4, "embed_dim": 128, "num_heads": 4, "mlp_ratio": 4},
    "text_config": {**MODEL_PRESET["text"],
                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}},
    "words": EXTRA_WORDS,
}


# --- model and processor ---------------------------------------------------------------------------------

def build_processor() -> LlavaProcessor:
    tokenizer = build_word_tokenizer(COMMON_WORDS + EXTRA_WORDS, [IMAGE_TOKEN], CHAT_TEMPLATE)
    return llava_processor(tokenizer, IMAGE_SIZE, PATCH, centre_crop=False)


def build_model(processor: LlavaProcessor, seed: int, preset: dict = MODEL_PRESET) -> LlavaForConditionalGeneration:
    tokenizer = processor.tokenizer
    config = llava_config(tokenizer, IMAGE_SIZE, PATCH, preset["vision"], preset["text"], vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


class AuxHeads(nn.Module):
    """Training-only heads on the visual tokens: colour and shape (cosine logits against the decoder's word
    embeddings, with learned background vectors) and left-to-right rank of the object a patch belongs to."""

    def __init__(self, model, tokenizer):
        super().__init__()
        dim = model.config.text_config.hidden_size
        ids = tokenizer.convert_tokens_to_ids
        self.register_buffer("colour_ids", torch.tensor([ids(c) for c in COLOURS]), persistent=False)
        self.register_buffer("shape_ids", torch.tensor([ids(s) for s in SHAPES]), persistent=False)
        self.colour_bg = nn.Parameter(torch.randn(dim) * 0.02)
        self.shape_bg = nn.Parameter(torch.randn(dim) * 0.02)
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.rank = nn.Linear(dim, 4)
        self.register_buffer("lens_ids", torch.cat([self.colour_ids, self.shape_ids]), persistent=False)

    def forward(self, features, embedding):
        colour_w = torch.cat([self.colour_bg[None], embedding(self.colour_ids)])
        shape_w = torch.cat([self.shape_bg[None], embedding(self.shape_ids)])
        f = F.normalize(features, dim=-1)
        colour = self.scale * f @ F.normalize(colour_w, dim=-1).T
        shape = self.scale * f @ F.normalize(shape_w, dim=-1).T
        return colour, shape, self.rank(features)


class LlavaRecipe:
    """The shipped `demo` model: every image squashed to 96 x 96, 12 x 12 visual tokens, 1D positions."""

    name = "llava"
    model_class = LlavaForConditionalGeneration
    out, ckpt = "assets/demo-model", ".train/ckpt.pt"
    image_token = IMAGE_TOKEN

    def build(self, seed: int):
        processor = build_processor()
        return build_model(processor, seed), processor

    def answer_end(self, tokenizer) -> int:
        return tokenizer.eos_token_id

    def grids(self, image_inputs) -> list[tuple[int, int]]:
        return [(GRID, GRID)] * len(image_inputs["pixel_values"])

    def prefix_positions(self, image_start: int, rows: int, cols: int) -> torch.Tensor:
        return torch.arange(image_start + rows * cols)[None]

    def image_features(self, model, batch) -> torch.Tensor:
        """(images, 144, hidden): the projected patch features of the chosen vision layer, CLS dropped."""
        core = model.model
        vision = core.vision_tower(batch["pixel_values"], output_hidden_states=True)
        return core.multi_modal_projector(vision.hidden_states[model.config.vision_feature_layer][:, 1:])


class Qwen2VLRecipe:
    """`demo-qwen2_vl`: Qwen2-VL's processor (aspect kept, ~144 merged cells), merged 2 x 2 patches, M-RoPE."""

    name = "qwen2_vl"
    model_class = Qwen2VLForConditionalGeneration
    out, ckpt = "assets/demo-qwen2_vl", ".train-qwen2_vl/ckpt.pt"
    image_token = "<|image_pad|>"

    def build(self, seed: int):
        """The model and processor the product builds for this family, at the demo's sizes."""
        torch.manual_seed(seed)  # the auxiliary heads, built next, are seeded too
        model, processor = Qwen2VLFamily().build_random({**QWEN2_VL_PRESET, "seed": seed})
        model.set_attn_implementation("sdpa")
        tokenizer = processor.tokenizer
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = self.answer_end(tokenizer)
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        return model, processor

    def answer_end(self, tokenizer) -> int:
        return tokenizer.convert_tokens_to_ids("<|im_end|>")

    def grids(self, image_inputs) -> list[tuple[int, int]]:
        merge = QWEN2_VL_PRESET["image"]["merge"]
        return [(h // merge, w // merge) for _, h, w in image_inputs["image_grid_thw"].tolist()]

    def prefix_positions(self, image_start: int, rows: int, cols: int) -> torch.Tensor:
        """(3, n) M-RoPE positions of the text before the image and of the merged image tokens, as
        Qwen2VLModel.get_rope_index gives them."""
        text = torch.arange(image_start)[None].expand(3, -1)
        row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        image = image_start + torch.stack([torch.zeros(rows * cols, dtype=torch.long), row.flatten(), col.flatten()])
        return torch.cat([text, image], dim=1)

    def image_features(self, model, batch) -> torch.Tensor:
        """(merged tokens of all images, hidden), image after image, each in the processor's row-major order."""
        return model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output


FAMILIES = {recipe.name: recipe for recipe in (LlavaRecipe(), Qwen2VLRecipe())}


def recipe_for(model):
    return FAMILIES[model.config.model_type]


# --- data ------------------------------------------------------------------------------------------------

def scene_size(seed: int) -> tuple[int, int]:
    """Training images come in varied sizes and aspect ratios (the processor squashes them to 96 x 96, or for
    Qwen2-VL resizes them to about 144 merged cells)."""
    rng = random.Random(seed * 7919 + 17)
    side = rng.randint(96, 224)
    if rng.random() < 0.7:
        return side, side
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.67)))
    return max(64, round(side * math.sqrt(aspect))), max(64, round(side / math.sqrt(aspect)))


def patch_coverage(scene: Scene, grid: tuple[int, int] = (GRID, GRID)) -> torch.Tensor:
    """(objects, rows x cols): the fraction of each visual token's cell (the processor keeps the whole image) each
    object covers."""
    masks = torch.from_numpy(np.stack(scene.masks)).float()[:, None]
    return F.adaptive_avg_pool2d(masks, grid).flatten(1)


class Encoder:
    """Turns scenes and questions into the tree-packed training tensors."""

    def __init__(self, processor, recipe=FAMILIES["llava"]):
        self.processor = processor
        self.recipe = recipe
        self.tokenizer = tok = processor.tokenizer
        self.image_id = tok.convert_tokens_to_ids(recipe.image_token)
        self.eos = recipe.answer_end(tok)
        self.pad = tok.pad_token_id
        self._cache: dict[str, list[int]] = {}
        sample = self.prompt_ids("Describe the image.")
        self.image_start = sample.index(self.image_id)
        self.text_before_image = sample[:self.image_start]
        self.answer_cache: dict[str, list[int]] = {}

    def chat(self, prompt: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids of the chat for `prompt`, with one image token (the processor expands it to the image's grid)."""
        if prompt not in self._cache:
            ids = self.tokenizer(self.chat(prompt), add_special_tokens=True)["input_ids"]
            assert ids.count(self.image_id) == 1, prompt
            self._cache[prompt] = ids
        return self._cache[prompt]

    def tail_ids(self, prompt: str) -> list[int]:
        """The prompt's ids after the image: what a question-answer branch starts with."""
        ids = self.prompt_ids(prompt)
        assert ids[:self.image_start] == self.text_before_image, prompt
        return ids[self.image_start + 1:]

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self.answer_cache:
            ids = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            assert self.tokenizer.unk_token_id not in ids, answer
            self.answer_cache[answer] = ids + [self.eos]
        return self.answer_cache[answer]

    def encode(self, scenes: list[Scene], questions: list[list[tuple[str, str]]]):
        images = [scene.image for scene in scenes]
        image_inputs = dict(self.processor.image_processor(images, return_tensors="pt"))
        grids = self.recipe.grids(image_inputs)
        n_image = max(rows * cols for rows, cols in grids)  # visual tokens of the largest grid
        rows, branches_meta = [], []
        for scene, qas, (grid_rows, grid_cols) in zip(scenes, questions, grids, strict=True):
            ids, spans = self.text_before_image + [self.image_id] * (grid_rows * grid_cols), []
            for prompt, answer in qas:
                tail = self.tail_ids(prompt)
                ans = self.answer_ids(answer)
                start = len(ids)
                ids += tail + ans
                spans.append((start, start + len(tail), len(ids), prompt, answer))
            rows.append(ids)
            branches_meta.append(spans)
        length = max(len(r) for r in rows)
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad, dtype=torch.long)
        # one row of positions (LLaVA) or three (Qwen2-VL's M-RoPE: t, h, w)
        n_position_rows = len(self.recipe.prefix_positions(self.image_start, 1, 1))
        position_ids = torch.zeros((n_position_rows, batch, length), dtype=torch.long)
        mask = torch.zeros((batch, 1, length, length), dtype=torch.bool)
        label_pos, label_ids, label_kind, label_q = [], [], [], []  # flat lists over the batch
        attn = []  # (batch, query position, head, target vector)
        # per image token of the largest grid; tokens a smaller grid lacks keep -100 (ignored)
        patch_colour = torch.full((batch, n_image), -100, dtype=torch.long)
        patch_shape = torch.full((batch, n_image), -100, dtype=torch.long)
        patch_rank = torch.full((batch, n_image), -100, dtype=torch.long)
        n_questions = 0
        for b, (ids, spans, scene, grid) in enumerate(zip(rows, branches_meta, scenes, grids, strict=True)):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            prefix_positions = self.recipe.prefix_positions(self.image_start, *grid)
            n_prefix = prefix_positions.shape[1]
            branch_start = int(prefix_positions.max()) + 1  # where every branch's positions restart
            position_ids[:, b, :n_prefix] = prefix_positions
            mask[b, 0, :n_prefix, :n_prefix] = torch.ones((n_prefix, n_prefix), dtype=torch.bool).tril()
            for t in range(len(ids), length):
                mask[b, 0, t, t] = True
            cover = patch_coverage(scene, grid)
            n_cells = cover.shape[1]
            order = scene.left_to_right()
            rank_of = {obj: r for r, obj in enumerate(order)}
            total = cover.sum(0)
            best = cover.argmax(0)
            colour_label = torch.tensor([1 + list(COLOURS).index(o.colour) for o in scene.objects])[best]
            shape_label = torch.tensor([1 + SHAPES.index(o.shape) for o in scene.objects])[best]
            rank_label = torch.tensor([1 + rank_of[i] for i in range(len(scene.objects))])[best]
            solid, empty = cover.max(0).values >= 0.5, total < 0.05
            patch_colour[b, :n_cells] = torch.where(solid, colour_label, torch.where(empty, 0, -100))
            patch_shape[b, :n_cells] = torch.where(solid, shape_label, torch.where(empty, 0, -100))
            patch_rank[b, :n_cells] = torch.where(solid, rank_label, torch.where(empty, 0, -100))
            for start, answer_start, end, prompt, answer in spans:
                n = end - start
                position_ids[:, b, start:end] = torch.arange(branch_start, branch_start + n)
                mask[b, 0, start:end, :n_prefix] = True
                mask[b, 0, start:end, start:end] = torch.ones((n, n), dtype=torch.bool).tril()
                kind, args = parse_prompt(prompt)
                for t in range(answer_start - 1, end - 1):
                    label_pos.append((b, t))
                    label_ids.append(ids[t + 1])
                    label_q.append(n_questions)
                label_kind.append(KINDS.index(kind))
                n_questions += 1
                q = answer_start - 1  # the position that emits the first answer token
                objs = scene.objects

                def target(indices):
                    vec = cover[indices].sum(0) if indices else None
                    if vec is None or vec.sum() <= 0:
                        return None
                    return F.pad(vec / vec.sum(), (0, n_image - n_cells))

                heads = []
                if kind == "color":
                    hit = [i for i, o in enumerate(objs) if o.shape == args[0]]
                    heads = [(q, 0, target(hit)), (q, 2, target(hit))]
                elif kind == "shape":
                    hit = [i for i, o in enumerate(objs) if o.colour == args[0]]
                    heads = [(q, 0, target(hit)), (q, 1, target(hit))]
                elif kind == "exists":
                    both = [i for i, o in enumerate(objs) if o.colour == args[0] and o.shape == args[1]]
                    col = [i for i, o in enumerate(objs) if o.colour == args[0]]
                    shp = [i for i, o in enumerate(objs) if o.shape == args[1]]
                    heads = [(q, 0, target(both)), (q, 1, target(col)), (q, 2, target(shp))]
                elif kind == "count":
                    heads = [(q, 0, target(list(range(len(objs)))))]
                elif kind == "describe":
                    # answer tokens: a c s , a c s and a c s .  -> the token before c (the "a") and c itself
                    # emit the words of object k
                    for k, obj in enumerate(order):
                        a_pos = answer_start + 4 * k  # position of the k-th "a"
                        heads += [(a_pos, 0, target([obj])), (a_pos + 1, 0, target([obj]))]
                attn += [(b, t, h, vec) for t, h, vec in heads if vec is not None]
        return {
            **image_inputs, "input_ids": input_ids, "mask": mask,
            "position_ids": position_ids[0] if n_position_rows == 1 else position_ids,
            "label_pos": torch.tensor(label_pos), "label_ids": torch.tensor(label_ids),
            "label_q": torch.tensor(label_q), "q_kind": torch.tensor(label_kind), "n_questions": n_questions,
            "attn_b": torch.tensor([a[0] for a in attn], dtype=torch.long),
            "attn_t": torch.tensor([a[1] for a in attn], dtype=torch.long),
            "attn_h": torch.tensor([a[2] for a in attn], dtype=torch.long),
            "attn_target": torch.stack([a[3] for a in attn]) if attn else torch.zeros((0, n_image)),
            "patch_colour": patch_colour, "patch_shape": patch_shape, "patch_rank": patch_rank,
        }


def make_scenes(seeds, rng_seed_offset=0, n_exists=4):
    scenes, questions = [], []
    for seed in seeds:
        scene = draw_scene(seed, size=scene_size(seed))
        scenes.append(scene)
        questions.append(sample_questions(scene, random.Random(seed + rng_seed_offset), n_exists=n_exists))
    return scenes, questions


# --- forward ---------------------------------------------------------------------------------------------

def forward(model, aux, batch, attn_layer: int, with_aux: bool = True):
    core = model.model
    features = recipe_for(model).image_features(model, batch)
    embed = core.get_input_embeddings()
    inputs_embeds = embed(batch["input_ids"])
    image_mask = (batch["input_ids"] == model.config.image_token_id)[..., None]
    inputs_embeds = inputs_embeds.masked_scatter(image_mask, features.to(inputs_embeds.dtype))
    start, n_image = batch["image_start"], batch["patch_colour"].shape[1]
    out = core.language_model(inputs_embeds=inputs_embeds, attention_mask=batch["mask"],
                              position_ids=batch["position_ids"], output_hidden_states=with_aux)
    hidden = out.last_hidden_state
    lp = batch["label_pos"]
    logits = model.lm_head(hidden[lp[:, 0], lp[:, 1]])
    result = {"logits": logits}
    if not with_aux:
        return result
    if features.ndim == 2:  # Qwen2-VL: all images' tokens in one sequence; per image, padded to the largest grid
        is_image = image_mask[:, start:start + n_image]
        features = features.new_zeros(*is_image.shape[:2], features.shape[-1]).masked_scatter(is_image, features)
    result["patch"] = aux(features, embed)
    # logit lens at the image positions: the LM head read on the last layer's (normed) visual tokens
    result["lens"] = F.linear(hidden[:, start:start + n_image], model.lm_head.weight[aux.lens_ids])
    # attention of the supervised heads, recomputed from the layer's input
    layer = core.language_model.layers[attn_layer]
    x = layer.input_layernorm(out.hidden_states[attn_layer])
    att = layer.self_attn
    head_dim = att.head_dim
    b, t, h = batch["attn_b"], batch["attn_t"], batch["attn_h"]
    n_heads = model.config.text_config.num_attention_heads
    n_kv = model.config.text_config.num_key_value_heads
    q = att.q_proj(x[b, t]).view(len(b), n_heads, head_dim)  # (M, H, d)
    k = att.k_proj(x).view(x.shape[0], x.shape[1], n_kv, head_dim)  # (B, L, Hkv, d)
    cos, sin = core.language_model.rotary_emb(x, batch["position_ids"])
    q_cos, q_sin = cos[b, t][:, None], sin[b, t][:, None]
    q = q * q_cos + _rotate_half(q) * q_sin
    k = k * cos[:, :, None] + _rotate_half(k) * sin[:, :, None]
    q = q[torch.arange(len(b)), h]  # (M, d)
    k = k[b, :, h // (n_heads // n_kv)]  # (M, L, d)
    scores = torch.einsum("md,mld->ml", q, k) / math.sqrt(head_dim)
    allowed = batch["mask"][b, 0, t]
    scores = scores.masked_fill(~allowed, float("-inf"))
    logp = torch.log_softmax(scores, dim=-1)
    # a smaller grid's padding columns are text, maybe of another branch (-inf): they have no target, and 0 there
    # keeps 0 x -inf out of the loss
    result["attn_logp"] = logp[:, start:start + n_image].masked_fill(~allowed[:, start:start + n_image], 0.0)
    return result


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def losses(model, aux, batch, attn_layer, weights):
    result = forward(model, aux, batch, attn_layer)
    lm = F.cross_entropy(result["logits"], batch["label_ids"])
    colour, shape, rank = result["patch"]
    patch = (F.cross_entropy(colour.flatten(0, 1), batch["patch_colour"].flatten(), ignore_index=-100)
             + F.cross_entropy(shape.flatten(0, 1), batch["patch_shape"].flatten(), ignore_index=-100)
             + F.cross_entropy(rank.flatten(0, 1), batch["patch_rank"].flatten(), ignore_index=-100))
    if len(batch["attn_target"]):
        attn = -(batch["attn_target"] * result["attn_logp"]).sum(-1).mean()
    else:
        attn = torch.zeros(())
    lens = lens_loss(result["lens"], batch["patch_colour"], batch["patch_shape"])
    total = lm + weights["patch"] * patch + weights["attn"] * attn + weights["lens"] * lens
    return total, {"lm": lm.item(), "patch": patch.item(), "attn": attn.item(), "lens": lens.item()}


def lens_loss(lens_logits, patch_colour, patch_shape):
    """Binary cross-entropy on the colour and shape words' logits at every labelled visual token: positive for
    the words of the object covering it, negative for all others and everywhere on the background. It gives the
    visual tokens the vocabulary-space readability reported for LLaVA (Neo et al.), which TAM reads."""
    n_colours = len(COLOURS)
    labelled = (patch_colour >= 0) & (patch_shape >= 0)
    target = torch.zeros_like(lens_logits)
    on_object = labelled & (patch_colour > 0)
    b, p = on_object.nonzero(as_tuple=True)
    target[b, p, patch_colour[b, p] - 1] = 1.0
    target[b, p, n_colours + patch_shape[b, p] - 1] = 1.0
    if not labelled.any():
        return torch.zeros(())
    return F.binary_cross_entropy_with_logits(lens_logits[labelled], target[labelled])


@torch.no_grad()
def questions_correct(model, batch) -> torch.Tensor:
    """(questions,) bool, teacher-forced: every answer token (and the end token) is the argmax, which is exactly
    when greedy decoding writes the answer."""
    logits = forward(model, None, batch, 0, with_aux=False)["logits"]
    ok = (logits.argmax(-1) == batch["label_ids"]).float()
    return torch.ones(batch["n_questions"]).scatter_reduce(0, batch["label_q"], ok, reduce="amin").bool()


@torch.no_grad()
def teacher_forced_accuracy(model, encoder, seeds, batch_size=32, n_exists=4):
    """Per-kind exact accuracy with teacher forcing (`questions_correct`)."""
    model.eval()
    correct = {k: 0 for k in KINDS}
    total = {k: 0 for k in KINDS}
    for i in range(0, len(seeds), batch_size):
        scenes, questions = make_scenes(seeds[i:i + batch_size], n_exists=n_exists)
        batch = encoder.encode(scenes, questions)
        batch["image_start"] = encoder.image_start
        per_q = questions_correct(model, batch)
        for kind_index, good in zip(batch["q_kind"].tolist(), per_q.tolist(), strict=True):
            kind = KINDS[kind_index]
            total[kind] += 1
            correct[kind] += int(good)
    model.train()
    return {k: correct[k] / max(1, total[k]) for k in KINDS}, total


# --- training loop ---------------------------------------------------------------------------------------

def lr_at(step, args, warm_start_step: int = 0):
    """Linear warm-up (again after a warm start, whose optimizer state is fresh), then cosine to 10%."""
    if step - warm_start_step < args.warmup:
        return args.lr * (step - warm_start_step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.total_steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


AUX_FILE = "training_aux.safetensors"  # training-only heads, so that a later session can continue from --out


def save_model(model, processor, out: Path, summary: dict, aux: nn.Module):
    out.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        for f in tmp.iterdir():
            f.unlink()
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    save_file({name: value.detach().contiguous() for name, value in aux.state_dict().items()}, str(tmp / AUX_FILE))
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=list(FAMILIES), default="llava",
                   help="the architecture: llava (the `demo` model) or qwen2_vl (`demo-qwen2_vl`)")
    p.add_argument("--out", help="where the model is written (default: assets/demo-model, assets/demo-qwen2_vl)")
    p.add_argument("--ckpt", help="the training checkpoint (default: .train/ckpt.pt, .train-qwen2_vl/ckpt.pt)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--minutes", type=float, default=60.0, help="stop (after checkpointing) after this long")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--total-steps", type=int, default=20000, help="length of the cosine schedule")
    p.add_argument("--attn-layer", type=int, default=2)
    p.add_argument("--w-attn", type=float, default=1.0)
    p.add_argument("--w-patch", type=float, default=0.5)
    p.add_argument("--w-lens", type=float, default=0.5, help="weight of the logit-lens loss on visual tokens")
    p.add_argument("--n-exists", type=int, default=4)
    p.add_argument("--eval-every", type=float, default=6.0, help="minutes between held-out evaluations")
    p.add_argument("--eval-n", type=int, default=300)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true", help="probe: do not write --out")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    recipe = FAMILIES[args.family]
    args.out, args.ckpt = args.out or recipe.out, args.ckpt or recipe.ckpt
    model, processor = recipe.build(args.seed)
    model.train()
    encoder = Encoder(processor, recipe)
    aux = AuxHeads(model, processor.tokenizer)
    decay, no_decay = [], []
    for module in (model, aux):
        for name, param in module.named_parameters():
            (decay if param.ndim >= 2 and "embed" not in name else no_decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98))
    step, elapsed, best = 0, 0.0, -1.0
    history = []
    warm_start_step = 0
    ckpt, out = Path(args.ckpt), Path(args.out)
    if args.resume and not ckpt.is_file() and (out / AUX_FILE).is_file():
        # no local checkpoint (a new session): continue from the shipped model, with a fresh optimizer
        # from_pretrained maps the saved (hub-style) names back onto this transformers version's modules
        model.load_state_dict(recipe.model_class.from_pretrained(out).state_dict())
        aux.load_state_dict(load_file(str(out / AUX_FILE)))
        summary = json.loads((out / "training_summary.json").read_text())
        step, elapsed = summary["step"], summary["minutes_trained"] * 60
        best, history = summary.get("best", -1.0), summary.get("history", [])
        warm_start_step = step
        print(f"warm start from {out} at step {step} ({elapsed / 60:.1f} min trained)", flush=True)
    elif args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        aux.load_state_dict(state["aux"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, best, history = state["step"], state["elapsed"], state["best"], state.get("history", [])
        print(f"resumed from {ckpt} at step {step} ({elapsed / 60:.1f} min trained, best {best:.3f})", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters; args: {vars(args)}", flush=True)
    weights = {"patch": args.w_patch, "attn": args.w_attn, "lens": args.w_lens}
    eval_seeds = [HELD_OUT_SEED_START + i for i in range(args.eval_n)]

    def checkpoint():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "aux": aux.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "elapsed": elapsed, "best": best, "history": history, "args": vars(args)}, tmp)
        os.replace(tmp, ckpt)

    def evaluate():
        nonlocal best
        t0 = time.time()
        acc, total = teacher_forced_accuracy(model, encoder, eval_seeds, n_exists=args.n_exists)
        score = sum(acc.values()) / len(acc)
        history.append({"step": step, "minutes": round(elapsed / 60, 2), **{k: round(v, 4) for k, v in acc.items()}})
        line = " ".join(f"{k} {acc[k] * 100:5.1f}%" for k in KINDS)
        print(f"[eval] step {step} ({elapsed / 60:.1f} min): {line} (n={sum(total.values())}, "
              f"{time.time() - t0:.0f}s)", flush=True)
        if score > best:
            best = score
            if not args.no_save:
                save_model(model, processor, out, {"step": step, "minutes_trained": elapsed / 60, "best": best,
                                                  "held_out_teacher_forced": acc, "history": history,
                                                  "args": vars(args)}, aux)
                print(f"[save] {args.out} (mean {score * 100:.1f}%)", flush=True)
        return acc

    start = time.time()
    start_elapsed = elapsed
    last_ckpt = last_eval = time.time()
    running = {}
    while step < args.max_steps and time.time() - start < args.minutes * 60:
        t0 = time.time()
        seeds = [step * args.batch + i for i in range(args.batch)]
        scenes, questions = make_scenes(seeds, n_exists=args.n_exists)
        batch = encoder.encode(scenes, questions)
        batch["image_start"] = encoder.image_start
        t1 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args, warm_start_step)
        loss, parts = losses(model, aux, batch, args.attn_layer, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(aux.parameters()), 1.0)
        optimizer.step()
        step += 1
        elapsed = start_elapsed + time.time() - start
        for k, v in parts.items():
            running[k] = 0.98 * running.get(k, v) + 0.02 * v
        if step % 25 == 0:
            print(f"step {step} {elapsed / 60:.1f} min lr {lr_at(step, args, warm_start_step):.2e} "
                  + " ".join(f"{k} {v:.4f}" for k, v in running.items())
                  + f" | data {t1 - t0:.2f}s step {time.time() - t1:.2f}s", flush=True)
        if time.time() - last_eval > args.eval_every * 60:
            evaluate()
            last_eval = time.time()
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    evaluate()
    checkpoint()
    print(f"stopped at step {step} after {elapsed / 60:.1f} min trained", flush=True)


if __name__ == "__main__":
    sys.exit(main())
