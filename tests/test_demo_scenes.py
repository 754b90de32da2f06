"""The demo scene generator: deterministic, masks agree with objects, layout rules, reference answers."""

import random

import numpy as np
import pytest

from lvlm_interpret.demo.scenes import (
    COLOURS, MAX_SIZE, MIN_DX, MIN_SIZE, SHAPES, Scene, SceneObject, answer_for, describe, draw_scene,
    exists_candidates, normalise_answer, parse_prompt, question_kind, questions_for, sample_questions,
)

SEEDS = range(60)


def test_deterministic():
    for seed in (0, 7, 10**9 + 3):
        a, b = draw_scene(seed), draw_scene(seed)
        assert a.objects == b.objects
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))
    assert draw_scene(1).objects != draw_scene(2).objects or \
        not np.array_equal(np.asarray(draw_scene(1).image), np.asarray(draw_scene(2).image))


@pytest.mark.parametrize("size", [192, 96, (240, 120), (100, 180)])
def test_layout_rules(size):
    counts = set()
    for seed in SEEDS:
        scene = draw_scene(seed, size=size)
        width, height = scene.size
        assert (width, height) == ((size, size) if isinstance(size, int) else size)
        assert 1 <= len(scene.objects) <= 3 and len(scene.masks) == len(scene.objects)
        counts.add(len(scene.objects))
        short = min(width, height)
        for obj, mask in zip(scene.objects, scene.masks, strict=True):
            assert obj.colour in COLOURS and obj.shape in SHAPES
            assert mask.shape == (height, width) and mask.dtype == bool and mask.any()
            ys, xs = np.nonzero(mask)
            assert obj.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            side = max(obj.bbox[2] - obj.bbox[0], obj.bbox[3] - obj.bbox[1])
            assert MIN_SIZE * short - 2 <= side <= MAX_SIZE * short + 2
            x0, y0, x1, y1 = obj.bbox
            assert x0 <= obj.centre[0] <= x1 and y0 <= obj.centre[1] <= y1
        total = np.sum(scene.masks, axis=0)
        assert total.max() == 1  # non-overlapping
        centres = sorted(o.centre[0] for o in scene.objects)
        assert all(b - a >= MIN_DX * width for a, b in zip(centres, centres[1:]))
    assert counts == {1, 2, 3}


def test_masks_match_pixels():
    for seed in SEEDS:
        scene = draw_scene(seed)
        pixels = np.asarray(scene.image).astype(int)
        union = np.any(scene.masks, axis=0)
        background = pixels[~union]
        assert background.min() >= 215  # light background
        for obj, mask in zip(scene.objects, scene.masks, strict=True):
            colour = pixels[mask]
            assert (colour == colour[0]).all()  # one flat fill per object
            reference = np.array(COLOURS[obj.colour])
            assert np.abs(colour[0] - reference).max() <= 12
            nearest = min(COLOURS, key=lambda name: np.abs(colour[0] - np.array(COLOURS[name])).sum())
            assert nearest == obj.colour
            fill = mask.sum() / ((obj.bbox[2] - obj.bbox[0]) * (obj.bbox[3] - obj.bbox[1]))
            expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[obj.shape]
            assert abs(fill - expected) < 0.12


def _scene(*objects):
    return Scene(seed=-1, image=None, masks=[], objects=[
        SceneObject(colour, shape, (x, 10.0), (int(x) - 5, 5, int(x) + 5, 15)) for colour, shape, x in objects
    ])


def test_describe_left_to_right():
    scene = _scene(("blue", "square", 80), ("red", "circle", 10), ("green", "triangle", 150))
    assert describe(scene) == "a red circle, a blue square and a green triangle."
    assert describe(_scene(("red", "circle", 50))) == "a red circle."
    assert describe(_scene(("blue", "square", 90), ("red", "circle", 30))) == "a red circle and a blue square."
    for seed in SEEDS:
        scene = draw_scene(seed)
        names = describe(scene).rstrip(".").replace(" and ", ", ").split(", ")
        xs = [scene.objects[i].centre[0] for i in scene.left_to_right()]
        assert xs == sorted(xs) and names == [f"a {scene.objects[i].name}" for i in scene.left_to_right()]


def test_answer_rules():
    scene = _scene(("blue", "square", 80), ("red", "circle", 10), ("red", "triangle", 150))
    assert answer_for("What color is the square?", scene) == "blue"
    assert answer_for("what COLOR is the circle", scene) == "red"
    assert answer_for("  What colour is the   triangle ? ", scene) == "red"
    assert answer_for("What shape is the blue object?", scene) == "square"
    with pytest.raises(ValueError):
        answer_for("What shape is the red object?", scene)  # two red objects
    with pytest.raises(ValueError):
        answer_for("What color is the star?", scene)
    assert answer_for("Is there a red circle?", scene) == "yes"
    assert answer_for("is there a blue circle", scene) == "no"
    assert answer_for("How many shapes are there?", scene) == "three"
    assert answer_for("HOW MANY SHAPES ARE THERE", _scene(("red", "circle", 5))) == "one"
    assert answer_for("describe the image", scene) == "a red circle, a blue square and a red triangle."
    assert parse_prompt("Is there a Red Circle?") == ("exists", ("red", "circle"))
    assert normalise_answer("A red circle , a blue square.") == "a red circle, a blue square"


def test_questions_for():
    for seed in SEEDS:
        scene = draw_scene(seed)
        pairs = questions_for(scene)
        kinds = {question_kind(p) for p, _ in pairs}
        assert {"describe", "count", "exists"} <= kinds
        for prompt, answer in pairs:
            assert answer_for(prompt, scene) == answer
            assert answer_for(prompt.upper().rstrip("?"), scene) == answer
        present, hard, easy = exists_candidates(scene)
        assert len(present) + len(hard) + len(easy) == len(COLOURS) * len(SHAPES)
        for colour, shape in hard:
            assert any(o.colour == colour or o.shape == shape for o in scene.objects)
        chosen = sample_questions(scene, random.Random(seed))
        yes = [a for p, a in chosen if question_kind(p) == "exists" and a == "yes"]
        no = [a for p, a in chosen if question_kind(p) == "exists" and a == "no"]
        assert len(yes) == len(no) == 2
        assert all(answer_for(p, scene) == a for p, a in chosen)
