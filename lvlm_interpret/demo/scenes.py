"""Procedural scenes with ground truth for the demo model.

A scene is a plain light background with 1 to 3 non-overlapping filled shapes (circle, square, triangle) in
one of four colours (red, green, blue, yellow). Every scene is a pure function of its seed (and size), comes with
one boolean mask per object and the object list, and answers a small closed set of questions.

Layout rules (kept simple so that every answer is unambiguous):
- each shape's bounding box side is 15-30% of the image's shorter side; bounding boxes never overlap or touch;
- object centres differ in x by at least MIN_DX of the width, so "left to right" never hinges on a pixel.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("zero", "one", "two", "three")
MIN_SIZE, MAX_SIZE = 0.15, 0.30
MIN_DX = 0.06
GAP = 2  # pixels between bounding boxes
KINDS = ("describe", "color", "shape", "exists", "count")
HELD_OUT_SEED_START = 10 ** 9  # training scenes use seeds below this; held-out scenes are this + i

DESCRIBE_PROMPT = "Describe the image."
COUNT_PROMPT = "How many shapes are there?"


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    centre: tuple[float, float]  # (x, y) in pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), pixels, x1/y1 exclusive

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    seed: int
    image: Image.Image
    masks: list[np.ndarray]  # one (height, width) bool array per object, same order as `objects`
    objects: list[SceneObject] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def left_to_right(self) -> list[int]:
        return sorted(range(len(self.objects)), key=lambda i: self.objects[i].centre[0])


def _shape_mask(shape: str, bbox: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    x0, y0, x1, y1 = bbox
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(canvas) > 127


def _size(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    width, height = size
    return int(width), int(height)


def draw_scene(seed: int, size: int | tuple[int, int] = 192, n_objects: int | None = None) -> Scene:
    """The scene of `seed`, drawn at `size` (a side, or (width, height)); `n_objects` forces the object count."""
    width, height = _size(size)
    rng = random.Random(seed)
    n = n_objects if n_objects is not None else rng.randint(1, 3)
    if not 1 <= n <= 3:
        raise ValueError("a scene has 1 to 3 objects")
    grey = rng.randint(222, 255)
    background = tuple(min(255, grey + rng.randint(-4, 4)) for _ in range(3))
    short = min(width, height)
    while True:  # rejection sampling of a valid layout; restart from scratch when it gets stuck
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(200):
            side = max(3, round(rng.uniform(MIN_SIZE, MAX_SIZE) * short))
            x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
            box = (x0, y0, x0 + side, y0 + side)
            cx = x0 + side / 2
            if any(box[0] < b[2] + GAP and b[0] < box[2] + GAP and box[1] < b[3] + GAP and b[1] < box[3] + GAP
                   for b in boxes):
                continue
            if any(abs(cx - (b[0] + b[2]) / 2) < MIN_DX * width for b in boxes):
                continue
            boxes.append(box)
            if len(boxes) == n:
                break
        if len(boxes) == n:
            break
    objects, masks = [], []
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = background
    for box in boxes:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        mask = _shape_mask(shape, box, (width, height))
        rgb = np.array([min(255, max(0, c + rng.randint(-12, 12))) for c in COLOURS[colour]], dtype=np.uint8)
        pixels[mask] = rgb
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        objects.append(SceneObject(colour, shape, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), bbox))
        masks.append(mask)
    return Scene(seed=seed, image=Image.fromarray(pixels, "RGB"), masks=masks, objects=objects)


# --- questions and answers ------------------------------------------------------------------------------

def describe(scene: Scene) -> str:
    names = [f"a {scene.objects[i].name}" for i in scene.left_to_right()]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text + "."


def color_prompt(shape: str) -> str:
    return f"What color is the {shape}?"


def shape_prompt(colour: str) -> str:
    return f"What shape is the {colour} object?"


def exists_prompt(colour: str, shape: str) -> str:
    return f"Is there a {colour} {shape}?"


_PATTERNS = [
    ("describe", re.compile(r"describe the image")),
    ("color", re.compile(r"what colou?r is the (circle|square|triangle)")),
    ("shape", re.compile(r"what shape is the (red|green|blue|yellow) object")),
    ("exists", re.compile(r"is there a (red|green|blue|yellow) (circle|square|triangle)")),
    ("count", re.compile(r"how many shapes are there")),
]


def parse_prompt(prompt: str) -> tuple[str, tuple[str, ...]]:
    """(kind, arguments) of a prompt, case-insensitively, tolerating a missing '?' / '.' and extra spaces."""
    text = " ".join(prompt.lower().split()).rstrip(" ?.!")
    for kind, pattern in _PATTERNS:
        match = pattern.fullmatch(text)
        if match:
            return kind, match.groups()
    raise ValueError(f"not a demo question: {prompt!r}")


def question_kind(prompt: str) -> str:
    return parse_prompt(prompt)[0]


def answer_for(prompt: str, scene: Scene) -> str:
    """The reference answer; ValueError for a prompt outside the vocabulary or one the scene makes ambiguous."""
    kind, args = parse_prompt(prompt)
    objects = scene.objects
    if kind == "describe":
        return describe(scene)
    if kind == "count":
        return COUNT_WORDS[len(objects)]
    if kind == "color":
        hits = [o for o in objects if o.shape == args[0]]
        if len(hits) != 1:
            raise ValueError(f"{prompt!r} needs exactly one {args[0]}, the scene has {len(hits)}")
        return hits[0].colour
    if kind == "shape":
        hits = [o for o in objects if o.colour == args[0]]
        if len(hits) != 1:
            raise ValueError(f"{prompt!r} needs exactly one {args[0]} object, the scene has {len(hits)}")
        return hits[0].shape
    colour, shape = args
    return "yes" if any(o.colour == colour and o.shape == shape for o in objects) else "no"


def exists_candidates(scene: Scene) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """(present, hard negatives, other negatives) as (colour, shape) pairs.

    A hard negative shares its shape or its colour with an object of the scene."""
    present = sorted({(o.colour, o.shape) for o in scene.objects})
    hard, easy = [], []
    for colour in COLOURS:
        for shape in SHAPES:
            if (colour, shape) in present:
                continue
            if any(o.colour == colour or o.shape == shape for o in scene.objects):
                hard.append((colour, shape))
            else:
                easy.append((colour, shape))
    return present, hard, easy


def questions_for(scene: Scene) -> list[tuple[str, str]]:
    """Every valid question about the scene with its answer: describe, count, each unambiguous colour / shape
    question, and "is there" for every present pair and every negative (hard ones first)."""
    pairs = [(DESCRIBE_PROMPT, describe(scene)), (COUNT_PROMPT, COUNT_WORDS[len(scene.objects)])]
    for shape in SHAPES:
        prompt = color_prompt(shape)
        if sum(o.shape == shape for o in scene.objects) == 1:
            pairs.append((prompt, answer_for(prompt, scene)))
    for colour in COLOURS:
        prompt = shape_prompt(colour)
        if sum(o.colour == colour for o in scene.objects) == 1:
            pairs.append((prompt, answer_for(prompt, scene)))
    present, hard, easy = exists_candidates(scene)
    for colour, shape in present:
        pairs.append((exists_prompt(colour, shape), "yes"))
    for colour, shape in hard + easy:
        pairs.append((exists_prompt(colour, shape), "no"))
    return pairs


def sample_questions(scene: Scene, rng: random.Random, n_exists: int = 4) -> list[tuple[str, str]]:
    """A training / evaluation selection: describe, count, every colour and shape question, and `n_exists`
    "is there" questions, half yes and half no (no: 80% hard negatives)."""
    everything = questions_for(scene)
    chosen = [p for p in everything if question_kind(p[0]) != "exists"]
    present, hard, easy = exists_candidates(scene)
    for i in range(n_exists):
        if i % 2 == 0:
            colour, shape = rng.choice(present)
            chosen.append((exists_prompt(colour, shape), "yes"))
        else:
            pool = hard if hard and (rng.random() < 0.8 or not easy) else easy
            colour, shape = rng.choice(pool)
            chosen.append((exists_prompt(colour, shape), "no"))
    return chosen


def normalise_answer(text: str) -> str:
    """Answers compare lower-cased, whitespace-collapsed, without a trailing period."""
    return " ".join(text.lower().replace(" ,", ",").replace(" .", ".").split()).rstrip(".").strip()
