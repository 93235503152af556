"""The embedded demo models and their seeded problem generators (`problems`), so that anyone can draw fresh
held-out problems: `builtin:tiny`, four short tasks with exact answers on a 32-token canvas (tasks.py), and
`builtin:canvas256`, transformations and continuations of standard-library prose on the published 256-token canvas
(prose.py). bench/train_demo.py trains either."""

import random

from . import prose, tasks

NAMES = ("tiny", "canvas256")


def problems(name: str, seed: int, count: int) -> list[tuple[str, str | None, str]]:
    """`count` (prompt, answer, kind) triples of the embedded model `name`, drawn from `seed` (never seen in
    training); `answer` is None where the task is free continuation (agreement, not exact match, is its measure)."""
    rng = random.Random(seed)
    if name == "tiny":
        return [tasks.problem(rng) for _ in range(count)]
    if name == "canvas256":
        return [prose.problem(rng, held_out=True) for _ in range(count)]
    raise ValueError(f"no embedded model {name!r}; the embedded models are: {', '.join(NAMES)}")
