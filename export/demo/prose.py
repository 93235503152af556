"""Problems for the canvas-256 demo model, made from English prose every Python installation carries: the
standard library's own docstrings (their paragraphs of 120+ ASCII characters, collected at import time; Python
versions differ a little in them, so problems are reproducible for a given Python).

Checkable tasks transform a passage of exactly PASSAGE characters with a byte-level tokenizer, so every answer
character sits at a fixed distance from the character it depends on and fills one whole canvas (two for `twice`);
`continue` asks for the prose that follows a passage, free text whose measure is agreement, not exact match.
"""

import codecs
import functools
import importlib
import inspect
import random
import re
import sys
import warnings
import zlib

PASSAGE = 240  # characters: with EOS, one 256-token canvas of the byte-level tokenizer
CONTINUATION = 256
SKIPPED = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "venv",
           "pydoc_data", "test", "__phello__", "_pydecimal"}


TASKS = {
    # name: (instruction, answer of the passage)
    "upper": ("upper", str.upper),
    "swap": ("swap case", str.swapcase),
    "rot13": ("rot13", lambda text: codecs.encode(text, "rot13")),
    "words": ("one word per line", lambda text: text.replace(" ", "\n")),
    "twice": ("say it twice", lambda text: f"{text} {text}"),
}
KINDS = (*TASKS, "continue")


@functools.cache
def paragraphs(held_out: bool) -> tuple[str, ...]:
    """Docstring paragraphs of the importable standard library with at least PASSAGE + CONTINUATION ASCII
    characters of prose, whitespace folded, sorted; one in eight (by a hash of its text) is held out of training."""
    found = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names - SKIPPED):
            if name.startswith("_"):
                continue
            try:
                module = importlib.import_module(name)
            except Exception:  # platform modules, optional C extensions
                continue
            for member in [module, *vars(module).values()]:
                if not (inspect.ismodule(member) or inspect.isclass(member) or inspect.isroutine(member)):
                    continue
                for paragraph in re.split(r"\n\s*\n", inspect.getdoc(member) or ""):
                    text = " ".join(paragraph.split())
                    if (len(text) >= PASSAGE + CONTINUATION and text.isascii() and text.count(" ") * 12 > len(text)
                            and not text.startswith((">>>", "..", "-"))):
                        found.add(text)
    return tuple(sorted(t for t in found if (zlib.crc32(t.encode()) % 8 == 0) == held_out))


def passage(rng: random.Random, held_out: bool) -> tuple[str, str]:
    """A passage of PASSAGE characters and the CONTINUATION characters that follow it in its paragraph."""
    text = rng.choice(paragraphs(held_out))
    start = rng.randrange(len(text) - PASSAGE - CONTINUATION + 1)
    return text[start: start + PASSAGE], text[start + PASSAGE: start + PASSAGE + CONTINUATION]


def problem(rng: random.Random, kind: str | None = None, held_out: bool = True) -> tuple[str, str | None, str]:
    """(prompt, answer, kind). `continue` has answer None (its docstring's own continuation is one good answer of
    many; `example` gives it for training)."""
    prompt, answer, kind = example(rng, kind, held_out)
    return prompt, None if kind == "continue" else answer, kind


def example(rng: random.Random, kind: str | None = None, held_out: bool = False) -> tuple[str, str, str]:
    """(prompt, target, kind) for training: `continue`'s target is what follows the passage in its docstring."""
    kind = kind or rng.choice(KINDS)
    text, following = passage(rng, held_out)
    if kind == "continue":
        return f"continue: {text}", following, kind
    instruction, answer = TASKS[kind]
    return f"{instruction}: {text}", answer(text), kind
