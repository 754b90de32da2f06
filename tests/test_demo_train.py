"""The demo models' training code (lvlm_interpret/demo/train.py) on both families: the LLaVA recipe that made the
shipped `demo` weights is unchanged, and the tree-packed batches are exactly the single-turn inputs the product
sends, on LLaVA's 1D positions and on Qwen2-VL's merged patches and M-RoPE positions."""

import hashlib

import pytest
import torch

from lvlm_interpret import GenerationOptions, UserInputError, generate_with_capture, load_model
from lvlm_interpret.demo import train
from lvlm_interpret.demo.scenes import HELD_OUT_SEED_START, draw_scene
from lvlm_interpret.models import loading

WEIGHTS = {"patch": 0.5, "attn": 1.0, "lens": 0.5}
ATTN_LAYER = 2


def fingerprint(batch) -> str:
    digest = hashlib.sha256()
    for name in sorted(batch):
        value = batch[name]
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype} {tuple(value.shape)}".encode())
            digest.update(value.numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def encoded(recipe, seeds, seed=0):
    model, processor = recipe.build(seed)
    encoder = train.Encoder(processor, recipe)
    aux = train.AuxHeads(model, processor.tokenizer)
    scenes, questions = train.make_scenes(seeds)
    batch = encoder.encode(scenes, questions)
    batch["image_start"] = encoder.image_start
    return model, processor, encoder, aux, scenes, questions, batch


def test_the_llava_recipe_encodes_and_scores_a_batch_as_when_the_demo_model_was_trained():
    # figures of the training code that made assets/demo-model (before the second family was added): a retrained
    # `demo` model gets the same batches and the same losses
    torch.set_num_threads(1)
    model, _, _, aux, _, _, batch = encoded(train.FAMILIES["llava"], [0, 1, 2])
    assert fingerprint(batch) == "1449510cb214c574015560580f918d83a14f843787a7e2748ba3f0a4bc93bc89"
    model.train()
    total, parts = train.losses(model, aux, batch, ATTN_LAYER, WEIGHTS)
    assert parts == pytest.approx({"lm": 4.827526092529297, "patch": 3.9042019844055176,
                                   "attn": 5.036370754241943, "lens": 0.7032743096351624}, rel=1e-5)
    assert total.item() == pytest.approx(12.167634963989258, rel=1e-5)


def single_turn(model, processor, encoder, image, prompt, answer):
    """The product's input for one question (its processor and chat template), the answer appended, and the
    model's own forward (its own positions: 1D, or M-RoPE from get_rope_index)."""
    inputs = processor(images=[image], text=encoder.chat(prompt), return_tensors="pt")
    answer_ids = torch.tensor([encoder.answer_ids(answer)])
    n_prompt = inputs["input_ids"].shape[1]
    full = {"input_ids": torch.cat([inputs["input_ids"], answer_ids], 1)}
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    for name, value in inputs.items():
        if name not in full:  # per-position inputs (Qwen's mm_token_type_ids) extend over the answer as text
            per_position = value.dim() == 2 and value.shape[1] == n_prompt
            full[name] = torch.cat([value, torch.zeros_like(answer_ids, dtype=value.dtype)], 1) \
                if per_position else value
    return full, n_prompt, answer_ids.shape[1]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_every_packed_branch_is_the_single_turn_input_the_product_sends(family):
    # scenes of different sizes and aspect ratios: Qwen2-VL gives them different grids (9 x 15, 12 x 12, 13 x 10)
    torch.set_num_threads(1)
    recipe = train.FAMILIES[family]
    model, processor, encoder, aux, scenes, questions, batch = encoded(recipe, [0, 1, 11])
    model.eval()
    with torch.no_grad():
        packed = train.forward(model, aux, batch, ATTN_LAYER)
        total, _ = train.losses(model, aux, batch, ATTN_LAYER, WEIGHTS)
    assert torch.isfinite(total)
    model.set_attn_implementation("eager")  # to read the attention the supervised heads are trained on
    pairs = [(b, prompt, answer) for b, qas in enumerate(questions) for prompt, answer in qas]
    n_attention = 0
    for j, (b, prompt, answer) in enumerate(pairs):
        full, n_prompt, n_answer = single_turn(model, processor, encoder, scenes[b].image, prompt, answer)
        with torch.no_grad():
            out = model(**full, output_attentions=True)
        rows = (batch["label_q"] == j).nonzero().flatten()
        assert len(rows) == n_answer and (batch["label_pos"][rows, 0] == b).all()
        assert batch["label_ids"][rows].tolist() == full["input_ids"][0, n_prompt:].tolist()
        single = out.logits[0, n_prompt - 1:n_prompt - 1 + n_answer]
        torch.testing.assert_close(packed["logits"][rows], single, atol=1e-5, rtol=1e-5)
        # the supervised heads' attention over the image tokens, recomputed in training, is the model's own
        query = batch["label_pos"][rows[0], 1]
        n_image = int((full["input_ids"][0] == model.config.image_token_id).sum())
        start = encoder.image_start
        for e in ((batch["attn_b"] == b) & (batch["attn_t"] == query)).nonzero().flatten().tolist():
            own = out.attentions[ATTN_LAYER][0, batch["attn_h"][e], n_prompt - 1, start:start + n_image]
            torch.testing.assert_close(packed["attn_logp"][e, :n_image].exp(), own, atol=1e-5, rtol=1e-4)
            n_attention += 1
    assert n_attention > 10


def test_qwen2_vl_batches_pad_smaller_grids_with_ignored_cells():
    _, _, _, _, _, _, batch = encoded(train.FAMILIES["qwen2_vl"], [0, 1])
    (rows_a, cols_a), (rows_b, cols_b) = [(h // 2, w // 2) for _, h, w in batch["image_grid_thw"].tolist()]
    assert (rows_a * cols_a, rows_b * cols_b) == (135, 144)
    assert batch["position_ids"].shape[0] == 3  # M-RoPE: t, h, w
    # the image's tokens: t = start, (h, w) = start + (row, column); the text after it continues at
    # start + max(rows, columns) on all three rows
    start = batch["image_start"]
    positions = batch["position_ids"][:, 0]
    assert positions[:, start + cols_a + 2].tolist() == [start, start + 1, start + 2]
    assert positions[:, start + rows_a * cols_a].tolist() == [start + max(rows_a, cols_a)] * 3
    assert (batch["patch_colour"][0, 135:] == -100).all() and (batch["patch_colour"][0, :135] >= -100).all()
    first = batch["attn_target"][batch["attn_b"] == 0]
    assert (first[:, 135:] == 0).all()
    torch.testing.assert_close(first.sum(1), torch.ones(len(first)))


@pytest.mark.parametrize("name", sorted(loading.BUILTIN_MODELS))
def test_the_product_answers_exactly_what_training_measured(name):
    # the shipped folder, loaded and asked through the product's own path, writes an answer exactly when the
    # teacher-forced check of training counts it right (same tokens, grid, positions and end token)
    torch.set_num_threads(1)
    loaded = load_model(name, device="cpu")
    recipe = train.FAMILIES[loaded.model.config.model_type]
    encoder = train.Encoder(loaded.processor, recipe)
    scenes, questions = train.make_scenes([HELD_OUT_SEED_START + i for i in range(4)])
    batch = encoder.encode(scenes, questions)
    batch["image_start"] = encoder.image_start
    measured = train.questions_correct(loaded.model, batch).tolist()
    pairs = [(scene, prompt, answer) for scene, qas in zip(scenes, questions, strict=True) for prompt, answer in qas]
    for (scene, prompt, answer), counted in zip(pairs, measured, strict=True):
        trace = generate_with_capture(loaded, [scene.image], prompt, GenerationOptions(max_new_tokens=20))
        written = trace.answer_ids == encoder.answer_ids(answer)[:-1]  # the trace ends before the end token
        assert written == counted, (prompt, answer, trace.answer)


def test_a_builtin_model_missing_from_the_install_is_one_clear_message(monkeypatch, tmp_path):
    monkeypatch.setitem(loading.BUILTIN_MODELS, "demo-qwen2_vl", tmp_path / "absent")
    with pytest.raises(UserInputError, match="built-in model 'demo-qwen2_vl' is not installed") as raised:
        load_model("demo-qwen2_vl", device="cpu")
    assert "python -m lvlm_interpret.demo.train" in str(raised.value)


@pytest.mark.parametrize(("size", "grid"), [((192, 192), (12, 12)), ((240, 160), (9, 14)), ((120, 200), (16, 10))])
def test_demo_qwen2_vl_is_a_small_qwen2_vl_whose_grid_keeps_the_aspect_ratio(size, grid):
    loaded = load_model("demo-qwen2_vl", device="cpu")
    assert type(loaded.model).__name__ == "Qwen2VLForConditionalGeneration"
    assert (loading.BUILTIN_MODELS["demo-qwen2_vl"] / "model.safetensors").stat().st_size <= 20 * 10 ** 6
    scene = draw_scene(HELD_OUT_SEED_START + 7, size)
    trace = generate_with_capture(loaded, [scene.image], "How many shapes are there?", GenerationOptions(4))
    layout = trace.images[0]
    assert (layout.rows, layout.cols) == grid  # 2 x 2 merged cells of 8 px patches, about 144 of them
    assert layout.box == (0.0, 0.0, float(size[0]), float(size[1]))
