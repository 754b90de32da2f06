"""The ground-truth benchmark on held-out synthetic scenes: "Describe the image.", and each colour and shape word
of a pair that names the right object is scored against its class (every object of that colour / shape) and
against that object alone."""

from __future__ import annotations

import numpy as np

from ..demo.scenes import COLOURS, DESCRIBE_PROMPT, HELD_OUT_SEED_START, SHAPES, describe, draw_scene, normalise_answer
from .benchmark import Sample, WordTarget
from .words import Word


def object_words(words: list[Word], scene) -> list[tuple[Word, int, str]]:
    """(word, object index, "colour" | "shape") for each "<colour> <shape>" pair of a description that names the
    object at the same left-to-right place; wrongly named objects are skipped."""
    order = scene.left_to_right()
    found, pair = [], 0
    for first, second in zip(words, words[1:]):
        if first.text in COLOURS and second.text in SHAPES:
            if pair < len(order):
                target = scene.objects[order[pair]]
                if (target.colour, target.shape) == (first.text, second.text):
                    found += [(first, order[pair], "colour"), (second, order[pair], "shape")]
            pair += 1
    return found


def shapes_sample(index: int, size: int | tuple[int, int] = 192, seed_start: int = HELD_OUT_SEED_START) -> Sample:
    scene = draw_scene(seed_start + index, size)

    def targets(words: list[Word]) -> list[WordTarget]:
        found = []
        for word, obj, kind in object_words(words, scene):
            attribute = (lambda o: o.colour) if kind == "colour" else (lambda o: o.shape)
            # the word's class: every object of its colour / shape
            sharing = [k for k, o in enumerate(scene.objects) if attribute(o) == attribute(scene.objects[obj])]
            found.append(WordTarget(word, np.logical_or.reduce([scene.masks[k] for k in sharing]),
                                    unique=len(sharing) == 1, instance_mask=scene.masks[obj]))
        return found

    expected = normalise_answer(describe(scene))
    return Sample(key=str(scene.seed), image=scene.image, prompt=DESCRIBE_PROMPT, targets=targets,
                  reference_answer=lambda answer: normalise_answer(answer) == expected)
