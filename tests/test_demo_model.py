"""The shipped demo models: load like any checkpoint, keep their held-out accuracy, covers any image shape."""

import random
from pathlib import Path

import pytest

from lvlm_interpret import DEFAULT_MODEL, GenerationOptions, generate_with_capture, load_model
from lvlm_interpret.demo.scenes import (
    HELD_OUT_SEED_START, KINDS, draw_scene, normalise_answer, question_kind, sample_questions,
)

MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo-model"
N_SCENES = 40
# The bar (>= 0.97 per question kind, >= 0.90 for "Describe the image.") on the first N_SCENES held-out scenes:
# the test fails if a change to the weights, loading, processing or generation makes either shipped model worse.
# The shipped weights score describe 39/40 and every other kind 100% here (demo), every kind 100%
# (demo-qwen2_vl, step 1111).
MIN_ACCURACY = {"describe": 0.90, "color": 0.97, "shape": 0.97, "exists": 0.97, "count": 0.97}


@pytest.fixture(scope="module")
def demo():
    return load_model("demo", device="cpu")


def test_demo_is_the_default_and_a_plain_small_llava(demo):
    assert DEFAULT_MODEL == "demo"
    assert type(demo.model).__name__ == "LlavaForConditionalGeneration"
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 50 * 2 ** 20
    assert not list(MODEL_DIR.glob("*.bin"))  # safetensors only


@pytest.mark.parametrize("name", ["demo", "demo-qwen2_vl"])
def test_held_out_accuracy_does_not_regress(demo, name):
    model = demo if name == "demo" else load_model(name, device="cpu")
    correct = {kind: 0 for kind in KINDS}
    total = {kind: 0 for kind in KINDS}
    for k in range(N_SCENES):
        seed = HELD_OUT_SEED_START + k
        scene = draw_scene(seed, 192)
        for prompt, answer in sample_questions(scene, random.Random(seed)):
            got = generate_with_capture(model, [scene.image], prompt, GenerationOptions(max_new_tokens=20)).answer
            kind = question_kind(prompt)
            total[kind] += 1
            correct[kind] += normalise_answer(got) == normalise_answer(answer)
    accuracy = {kind: correct[kind] / total[kind] for kind in KINDS}
    assert all(accuracy[kind] >= MIN_ACCURACY[kind] for kind in KINDS), accuracy


@pytest.mark.parametrize("size", [(240, 160), (120, 200), (500, 500)])
def test_any_image_size_is_resized_onto_the_whole_grid(demo, size):
    scene = draw_scene(HELD_OUT_SEED_START + 7, size)
    trace = generate_with_capture(demo, [scene.image], "How many shapes are there?", GenerationOptions(4))
    layout = trace.images[0]
    assert (layout.rows, layout.cols) == (12, 12)
    assert layout.box == (0.0, 0.0, float(size[0]), float(size[1]))
    assert normalise_answer(trace.answer) in {"one", "two", "three"}
