"""The embedded demo models and their seeded problem generators (`problems`), so that anyone can draw fresh
held-out problems: `builtin:tiny`, a tiny DiffusionGemma trained here on synthetic tasks with checkable answers
(bench/train_demo.py reproduces it)."""

import random

from .tasks import problem


def problems(name: str, seed: int, count: int) -> list[tuple[str, str | None, str]]:
    """`count` (prompt, answer, kind) triples of the embedded model `name`, drawn from `seed`; `answer` is None
    where the task is free continuation (agreement, not exact match, is its measure)."""
    if name != "tiny":
        raise ValueError(f"no embedded model {name!r}; the embedded models are: tiny")
    rng = random.Random(seed)
    return [problem(rng) for _ in range(count)]
