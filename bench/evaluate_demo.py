"""Exact-match accuracy, tokens per forward and steps per block of an embedded demo model on held-out problems,
with default generation settings, under transformers and under exported artifacts — all driven by the same noise
per problem.

    python bench/evaluate_demo.py [--model tiny|canvas256] [--checkpoint DIR] [--artifact DIR] [--problems 200]

Problems come from `dg_export.demo.problems(model, 12345, count)`; exact match counts the checkable ones (free
continuation has no single answer: its measure is agreement with transformers). With an artifact it prints steps per
block per kind, and for `tiny` runs 30 two-turn chats through `dg_runtime.Chat` (the second turn reuses the cache).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dg_runtime import Chat, DiffusionGemma, NoiseSource, Settings
from dg_runtime.streamer import reply_tokens
from dg_runtime.text import TextCodec

from dg_export.builtin import BUILTINS
from dg_export.demo import problems as draw_problems
from dg_export.reference import generate_with_noise



def score(answers: list[str], expected: list[str | None], tokens_per_forward: list[float], seconds: float) -> dict:
    checked = [(a, e) for a, e in zip(answers, expected) if e is not None]
    return {"accuracy": sum(a == e for a, e in checked) / max(len(checked), 1),
            "tokens_per_forward": float(np.mean(tokens_per_forward)), "seconds": seconds}


def evaluate_transformers(checkpoint: Path, problems, codec: TextCodec) -> tuple[dict, list]:
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, dtype=torch.float32).eval()
    settings = Settings.from_generation_config(json.loads((checkpoint / "generation_config.json").read_text()))
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    answers, rates, started = [], [], time.perf_counter()
    for seed, (instruction, _, _) in enumerate(problems):
        ids = np.array([codec.chat_ids([{"role": "user", "content": instruction}])])
        tokens, recorder = generate_with_noise(model, ids, settings, NoiseSource(seed))
        answers.append(codec.decode(reply_tokens(tokens[0], eos, pad)))
        rates.append(int((tokens[0, : settings.max_new_tokens] != pad).sum()) / len(recorder.logits))  # as transformers counts
    return score(answers, [a for _, a, _ in problems], rates, time.perf_counter() - started), answers


def evaluate_artifact(artifact: Path, backend: str, problems) -> tuple[dict, list]:
    model = DiffusionGemma(artifact, backend=backend)
    answers, rates, steps, started = [], [], {}, time.perf_counter()
    for seed, (instruction, _, kind) in enumerate(problems):
        done = model.generate([model.prompt_ids(instruction)], noise=NoiseSource(seed))
        answers.append(model.text.decode(model.reply(done.tokens[0])))
        rates.append(done.stats.tokens_per_forward)
        steps.setdefault(kind, []).extend(done.stats.steps_per_block)
    result = score(answers, [a for _, a, _ in problems], rates, time.perf_counter() - started)
    return {**result, "steps_per_block": steps}, answers


def evaluate_chats(artifact: Path, backend: str, problems) -> tuple[int, int]:
    """Two-turn chats through dg_runtime.Chat (the second turn reuses the cache): turns answered right."""
    model = DiffusionGemma(artifact, backend=backend)
    right = 0
    for i in range(0, len(problems) - 1, 2):
        chat = Chat(model)
        for instruction, answer in problems[i : i + 2]:
            right += chat.send(instruction, seed=i) == answer
    return right, len(problems) // 2 * 2


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/evaluate_demo.py")
    parser.add_argument("--model", choices=["tiny", "canvas256"], default="tiny")
    parser.add_argument("--checkpoint", type=Path, help="default: the embedded model's checkpoint")
    parser.add_argument("--artifact", type=Path, help="also evaluate this exported artifact on both backends")
    parser.add_argument("--problems", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    checkpoint = args.checkpoint or BUILTINS[f"builtin:{args.model}"]
    problems = draw_problems(args.model, 12345, args.problems)
    codec = TextCodec(checkpoint)
    rows = {"transformers": evaluate_transformers(checkpoint, problems, codec)}
    if args.artifact:
        for backend in ("onnxruntime", "openvino"):
            rows[backend] = evaluate_artifact(args.artifact, backend, problems)
    reference_answers = rows["transformers"][1]
    print(f"\n{len(problems)} held-out problems of {args.model}, default generation settings, same noise per problem\n")
    print("| runtime | exact match (checkable) | tokens per forward | answers identical to transformers | seconds |")
    print("|---|---:|---:|---:|---:|")
    for name, (result, answers) in rows.items():
        same = sum(a == b for a, b in zip(answers, reference_answers)) / len(problems)
        print(f"| {name} | {result['accuracy'] * 100:.1f} % | {result['tokens_per_forward']:.2f} | "
              f"{same * 100:.1f} % | {result['seconds']:.1f} |")
    if args.artifact:
        result, answers = rows["onnxruntime"]
        print("\n| kind | problems | exact match (onnxruntime) | steps per block: median (range) |")
        print("|---|---:|---:|---|")
        for kind, steps in sorted(result["steps_per_block"].items()):
            picked = [(a, e) for a, (_, e, k) in zip(answers, problems) if k == kind]
            exact = f"{np.mean([a == e for a, e in picked]) * 100:.0f} %" if picked[0][1] is not None else "n/a"
            print(f"| {kind} | {len(picked)} | {exact} | {np.median(steps):.0f} ({min(steps)}-{max(steps)}) |")
    if args.artifact and args.model == "tiny":
        chats = [(p, a) for p, a, _ in draw_problems("tiny", 999, 60)]
        for backend in ("onnxruntime", "openvino"):
            right, total = evaluate_chats(args.artifact, backend, chats)
            print(f"\ntwo-turn chats through dg_runtime.Chat on {backend}: {right} of {total} turns right")


if __name__ == "__main__":
    main()
