"""The shapes task: the same (split, index) always gives the same example, and every answer is
right about the picture as read from its pixels (tests/shape_pixels.py, which does not use the
generator's tables)."""

from __future__ import annotations

import re

import pytest
from shape_pixels import read_picture

from runtime.shapes_task import QUESTION_KINDS, SPLITS, corpus, example

PICTURES = [("train", i) for i in range(12)] + [("heldout", i) for i in range(8)] + [("examples", i) for i in range(4)]


def expected_answer(question: str, count: int, colour: str, shape: str) -> str:
    """The answer to `question` for a picture of `count` `colour` `shape`s, from the task's spec."""
    if question in ("What is this?", "What is in the image?", "What do you see?"):
        return f"a {colour} {shape}" if count == 1 else f"{count} {colour} {shape}s"
    if question in ("What shape is this?", "Which shape is shown?"):
        return shape
    if question in ("What color is the shape?", "What color is it?"):
        return colour
    if question in ("How many shapes?", "How many shapes are there?"):
        return str(count)
    named = re.fullmatch(r"How many (\w+)s( are there)?\?", question)
    if named:
        return str(count) if named.group(1) == shape else "0"
    raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("split,index", PICTURES)
def test_answers_are_right_about_the_pixels(split, index):
    ex = example(split, index)
    count, colour, shape = read_picture(ex.image())
    assert 1 <= count <= 5
    assert ex.answer == expected_answer(ex.question, count, colour, shape)
    # and every other kind of question about the same picture too
    for kind in QUESTION_KINDS:
        other = example(split, index, kind)
        assert other.kind == kind
        assert other.answer == expected_answer(other.question, count, colour, shape)


def test_examples_are_a_pure_function_of_split_and_index():
    a, b = example("heldout", 123), example("heldout", 123)
    assert (a.question, a.answer, a.scene) == (b.question, b.answer, b.scene)
    assert a.image().tobytes() == b.image().tobytes()
    assert example("train", 123).scene != a.scene


def test_splits_do_not_share_pictures():
    scenes = {split: {example(split, i).scene for i in range(300)} for split in SPLITS}
    assert scenes["train"].isdisjoint(scenes["heldout"])
    assert scenes["train"].isdisjoint(scenes["examples"])


def test_task_covers_every_kind_and_count():
    seen = [example("train", i) for i in range(400)]
    assert {ex.kind for ex in seen} == set(QUESTION_KINDS)
    assert {ex.scene.count for ex in seen} == {1, 2, 3, 4, 5}
    assert "0" in {ex.answer for ex in seen}
    text = set(corpus())
    assert all(ex.question in text and ex.answer in text for ex in seen)
