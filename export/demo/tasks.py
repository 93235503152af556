"""Synthetic instructions with one correct answer each, made from a seed (no data files, no network).

Every problem is a short chat turn ("upper: kqztabcd") whose answer is a deterministic function of its input,
so exact-match accuracy is a real measure of what the model learned. Each task has a fixed input length and
puts every answer token at a fixed distance from the input token it depends on, which a 1.5 M-parameter model
learns in minutes on a CPU (reversal and addition, whose alignment moves with the position, did not: 0 % and
6 % after the same budget). `shout` answers are longer than one 32-token canvas, so block transitions are
learned too. Held-out problems come from a separate seed stream and are excluded from training.
"""

import random
import string

LETTERS = string.ascii_lowercase


def shift(text: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in text)


TASKS = {
    # name: (input length, answer)
    "upper": (8, str.upper),
    "next": (8, shift),
    "greet": (5, lambda name: f"hello {name}, nice to meet you"),
    "shout": (40, str.upper),
}


def problem(rng: random.Random, task: str | None = None) -> tuple[str, str, str]:
    """(instruction, answer, task)."""
    task = task or rng.choice(sorted(TASKS))
    length, answer = TASKS[task]
    text = "".join(rng.choice(LETTERS) for _ in range(length))
    return f"{task}: {text}", answer(text), task


def held_out(count: int, seed: int = 12345) -> list[tuple[str, str]]:
    """(instruction, answer) pairs never seen in training (the training script excludes them)."""
    rng = random.Random(seed)
    return [problem(rng)[:2] for _ in range(count)]
