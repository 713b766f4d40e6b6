"""The demo model's task: pictures of coloured shapes and short questions about them.

Every example is a pure function of (split, index): the same pair gives the same picture,
question and answer on every machine, so training, evaluation, tests and the shipped example
images all draw from one generator and the held-out split never meets the training split.

A picture holds 1-5 copies of ONE shape in ONE colour at varied positions, on a plain
background of a varied colour, in a canvas of varied size and aspect ratio (the processor
later scales it to the crop size, so the model sees many scales). The copies in a picture are
one size, a nearly fixed fraction of the canvas, and every shape kind covers the same area, so
a count is readable from how much of the picture is covered: the tiny model can learn to count
in minutes on a CPU, which it cannot when sizes vary freely. Answers are short
and exact, so a greedy answer is either right or wrong:

    What is this?                 -> "a red circle" / "3 red circles"
    What shape is this?           -> "circle"
    What color is the shape?      -> "red"
    How many squares?             -> "3" ("0" when the picture holds another shape)
    How many shapes are there?    -> "3"
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
# Saturated, well separated hues; each picture jitters them a little.
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (240, 205, 30),
    "purple": (135, 55, 185),
    "orange": (245, 130, 25),
}
# Backgrounds are greys from near-white to near-black: no background could be named as a colour,
# and colour saturation alone tells a shape's pixels from the background's.
BACKGROUND_LEVELS = (245, 200, 150, 95, 30)
MAX_COUNT = 5

SPLITS = {"train": 0, "heldout": 1, "examples": 2}

# Question templates by kind; `{shape}`/`{color}` are filled in.
QUESTIONS = {
    "describe": ("What is this?", "What is in the image?", "What do you see?"),
    "shape": ("What shape is this?", "Which shape is shown?"),
    "color": ("What color is the shape?", "What color is it?"),
    "count_named": ("How many {shape}s?", "How many {shape}s are there?"),
    "count_all": ("How many shapes?", "How many shapes are there?"),
}
QUESTION_KINDS = tuple(QUESTIONS)


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    count: int
    size: tuple[int, int]  # canvas (width, height)
    background: tuple[int, int, int]
    fill: tuple[int, int, int]
    # (centre x, centre y, radius) of each shape, in canvas pixels
    items: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Example:
    scene: Scene
    kind: str
    question: str
    answer: str

    def image(self) -> Image.Image:
        return draw_scene(self.scene)


def describe(shape: str, color: str, count: int) -> str:
    return f"a {color} {shape}" if count == 1 else f"{count} {color} {shape}s"


def _rng(split: str, index: int, stream: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (one of {', '.join(SPLITS)})")
    # String seeds are hashed with SHA-512 by `random`, stable across runs and platforms.
    return random.Random(f"aria-shapes/{split}/{index}/{stream}")


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


# Bounding radius (centre to farthest point) per unit of "area radius": a shape of area radius
# b covers pi * b**2, whatever its kind, and fits in a circle of radius BOUND[shape] * b.
BOUND = {
    "circle": 1.0,
    "square": math.sqrt(math.pi / 2),  # half-diagonal of a square of side sqrt(pi) * b
    "diamond": math.sqrt(math.pi / 1.6),  # a diamond of half-height R, half-width 0.8 R, covers 1.6 R^2
    "triangle": math.sqrt(math.pi / (3 * math.sqrt(3) / 4)),  # equilateral, circumradius R covers 1.299 R^2
}
# Of sqrt(canvas area): each shape covers the same share of the picture, so the share of the picture
# that is coloured (an average over patches, what attention computes) says how many shapes there are.
AREA_RADIUS = 0.08
# Shapes stay apart by about one vision patch (70 of 980 pixels), so no two share a patch.
GAP = 0.075


def make_scene(rng: random.Random) -> Scene:
    long_side = rng.randint(320, 1024)
    # Aspect ratios k:14, so the picture fills whole rows of the 14 x 14 patches of a 980 crop
    # (a half-empty patch row would blur the coloured share of the picture).
    short_side = long_side * rng.randint(9, 14) // 14
    size = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    count = rng.randint(1, MAX_COUNT)
    shape = rng.choice(SHAPES)
    color = rng.choice(tuple(COLORS))
    radius = BOUND[shape] * AREA_RADIUS * math.sqrt(long_side * short_side) * rng.uniform(0.99, 1.01)
    return Scene(
        shape=shape,
        color=color,
        count=count,
        size=size,
        background=(rng.choice(BACKGROUND_LEVELS) + rng.randint(-12, 10),) * 3,
        fill=_jitter(COLORS[color], rng, 4),
        items=_place(rng, size, count, radius, GAP * long_side),
    )


def _place(rng, size, count, r, gap) -> tuple[tuple[int, int, int], ...]:
    """`count` (x, y, r) circles inside the canvas, at least `gap` apart; starts over from an empty
    canvas when random placement gets stuck (the sizes above always leave room for five)."""
    w, h = size
    while True:
        items: list[tuple[int, int, int]] = []
        for _ in range(50 * count):
            x, y = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
            if all(math.hypot(x - ox, y - oy) > 2 * r + gap for ox, oy, _ in items):
                items.append((round(x), round(y), round(r)))
                if len(items) == count:
                    return tuple(items)


def _outline(shape: str, x: int, y: int, r: int) -> list[tuple[float, float]]:
    """The polygon of `shape` inscribed in the circle (x, y, r)."""
    if shape == "square":
        s = r / math.sqrt(2)
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if shape == "diamond":
        return [(x, y - r), (x + r * 0.8, y), (x, y + r), (x - r * 0.8, y)]
    if shape == "triangle":
        return [(x + r * math.cos(a), y + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    raise ValueError(f"no outline for {shape}")


def draw_scene(scene: Scene) -> Image.Image:
    image = Image.new("RGB", scene.size, scene.background)
    pen = ImageDraw.Draw(image)
    for x, y, r in scene.items:
        if scene.shape == "circle":
            pen.ellipse((x - r, y - r, x + r, y + r), fill=scene.fill)
        else:
            pen.polygon(_outline(scene.shape, x, y, r), fill=scene.fill)
    return image


def make_question(scene: Scene, rng: random.Random, kind: str | None = None) -> tuple[str, str, str]:
    """(kind, question, answer) about `scene`; a random kind unless one is given."""
    kind = kind or rng.choice(QUESTION_KINDS)
    template = rng.choice(QUESTIONS[kind])
    if kind == "describe":
        return kind, template, describe(scene.shape, scene.color, scene.count)
    if kind == "shape":
        return kind, template, scene.shape
    if kind == "color":
        return kind, template, scene.color
    if kind == "count_all":
        return kind, template, str(scene.count)
    if kind == "count_named":
        # Mostly the shape that is there; sometimes another one, whose count is 0.
        asked = scene.shape if rng.random() < 0.7 else rng.choice([s for s in SHAPES if s != scene.shape])
        return kind, template.format(shape=asked), str(scene.count if asked == scene.shape else 0)
    raise ValueError(f"unknown question kind '{kind}'")


def example(split: str, index: int, kind: str | None = None) -> Example:
    """The example number `index` of `split` ("train", "heldout" or "examples")."""
    scene = make_scene(_rng(split, index, 0))
    kind, question, answer = make_question(scene, _rng(split, index, 1), kind)
    return Example(scene, kind, question, answer)


def follow_up_questions(split: str, index: int, n: int) -> list[tuple[str, str, str]]:
    """`n` more (kind, question, answer) about the same scene, for multi-turn training."""
    scene = make_scene(_rng(split, index, 0))
    rng = _rng(split, index, 2)
    return [make_question(scene, rng) for _ in range(n)]


def corpus() -> list[str]:
    """Every question and answer text the task can produce (the demo tokenizer's training text)."""
    lines = []
    for templates in QUESTIONS.values():
        for template in templates:
            for shape in SHAPES:
                for color in COLORS:
                    lines.append(template.format(shape=shape, color=color))
    for shape in SHAPES:
        for color in COLORS:
            lines += [describe(shape, color, n) for n in range(1, MAX_COUNT + 1)]
    lines += [*SHAPES, *COLORS, *(str(n) for n in range(MAX_COUNT + 1))]
    return sorted(set(lines))
