"""Train an embedded demo model from scratch on this machine's CPU.

    python bench/train_demo.py [--model tiny|canvas256] [--out FOLDER] [--steps N] [--seed 0]
    python bench/train_demo.py --model canvas256 --init FOLDER --steps N --lr LR [--focus KIND] [--label-smoothing E]

`tiny` (export/demo/checkpoint): four short tasks with exact answers, a 32-token canvas. `canvas256`
(export/demo/canvas256): transformations of 240-character passages of the Python standard library's docstrings
that fill a whole 256-token canvas (two for `twice`), and free continuation of such prose (export/demo/prose.py).

The objective is the one the model is sampled with: the prompt is read by the causal encoder; the canvas (one
block of the answer, then EOS, then pad) gets uniform-state noise — a sampled fraction of its tokens replaced by
random vocabulary tokens — and the denoiser predicts the clean block. Half of the batches first run without
self-conditioning and feed their own (tempered) prediction back, as the sampler does from the second step on.
Answers longer than a canvas are trained block by block, with the earlier blocks clean in the encoder, so block
transitions and EOS-then-pad are learned; for `tiny` a third of the prompts are second turns of a chat.

`--init` starts from a checkpoint of the same shape instead of random weights (a task added to a trained model);
`--focus KIND` makes half of the batches that kind's, the rest drawn from every kind as usual. canvas256's default
run has a second stage with label smoothing (CALIBRATION), from the first one's weights.
"""

import argparse
import copy
import functools
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from dg_runtime.text import TextCodec

from dg_export.builtin import DEMO_CHECKPOINT, GENERATION_CONFIG, tiny_config, write_tokenizer
from dg_export.demo import prose
from dg_export.demo.tasks import TASKS, held_out, problem

EOS, PAD = 4, 0  # <end_of_turn> ends an answer, as in Gemma's chat format
# model -> canvas, text config overrides (of builtin.TEXT_CONFIG), default steps, batch, learning rate
MODELS = {
    "tiny": (32, {}, 3000, 32, 3e-3),
    "canvas256": (256, {"hidden_size": 192, "intermediate_size": 384, "num_attention_heads": 4, "head_dim": 48,
                        "num_key_value_heads": 2, "global_head_dim": 96, "moe_intermediate_size": 192,
                        "sliding_window": 512}, 4000, 8, 2e-3),
}
# model -> a second stage from the first one's weights: steps, learning rate, label smoothing. canvas256's first stage
# ends with near-zero entropies on its transformations, so the sampler accepts a whole canvas at once; label smoothing
# gives its probabilities the floor a large model's have, and its steps per block spread (docs/benchmarks.md).
CALIBRATION = {"canvas256": (500, 5e-4, 0.03)}


def tiny_rows(rng: random.Random, codec: TextCodec, batch: int, excluded: set) -> list[tuple[list, list]]:
    """(prompt ids, answer ids + EOS) of one task; a third of the batches are second turns of a chat (an earlier
    problem and its answer come first), so the model also answers with a conversation in its cache."""
    task = rng.choice(sorted(TASKS))
    earlier_task = rng.choice(sorted(TASKS)) if rng.random() < 1 / 3 else None
    rows = []
    while len(rows) < batch:
        history = []
        if earlier_task:
            earlier, earlier_answer, _ = problem(rng, earlier_task)
            history = [{"role": "user", "content": earlier}, {"role": "assistant", "content": earlier_answer}]
        instruction, answer, _ = problem(rng, task)
        if instruction not in excluded:
            rows.append((codec.chat_ids([*history, {"role": "user", "content": instruction}]),
                         codec.encode(answer) + [EOS]))
    return rows


def prose_rows(rng: random.Random, codec: TextCodec, batch: int, excluded: set, focus: str | None = None
               ) -> list[tuple[list, list]]:
    """(prompt ids, target ids + EOS) of one kind, from the paragraphs not held out."""
    kind = focus if focus and rng.random() < 0.5 else rng.choice(prose.KINDS)
    rows = []
    for _ in range(batch):
        prompt, target, _ = prose.example(rng, kind, held_out=False)
        rows.append((codec.chat_ids([{"role": "user", "content": prompt}]), codec.encode(target) + [EOS]))
    return rows


def make_batch(rows: list[tuple[list, list]], rng: random.Random, canvas: int):
    """One block of the answers (the earlier blocks clean after the prompt): encoder inputs and canvas targets."""
    block = rng.randrange(math.ceil(min(len(a) for _, a in rows) / canvas))
    inputs = torch.tensor([p + a[: block * canvas] for p, a in rows])
    targets = torch.tensor([(a[block * canvas:] + [PAD] * canvas)[:canvas] for _, a in rows])
    return inputs, targets


def add_noise(targets: torch.Tensor, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform-state noise: each example replaces a fraction t of its canvas with random tokens; t = 1 (a pure
    noise canvas, the sampler's first step) for a quarter of the examples, t ~ U(0.05, 1) for the rest."""
    t = torch.rand(targets.shape[0], 1, generator=generator).clamp(min=0.05)
    t[torch.rand(targets.shape[0], generator=generator) < 0.25] = 1.0
    replace = torch.rand(targets.shape, generator=generator) < t
    return torch.where(replace, torch.randint(0, vocab, targets.shape, generator=generator), targets)


def train(name: str, out: Path, steps: int, seed: int, batch: int, lr: float, save_every: int,
          init: Path | None = None, focus: str | None = None, label_smoothing: float = 0.0) -> None:
    from transformers import DiffusionGemmaForBlockDiffusion

    canvas, overrides = MODELS[name][:2]
    dtype = torch.float32 if name == "tiny" else torch.bfloat16
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write_tokenizer(staging)
    codec = TextCodec(staging)
    rows = tiny_rows if name == "tiny" else functools.partial(prose_rows, focus=focus)
    excluded = {instruction for instruction, _ in held_out(200)}

    config = tiny_config(overrides, canvas_length=canvas)
    if init is None:
        model = DiffusionGemmaForBlockDiffusion(config).train()
    else:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(init, dtype=torch.float32).train()
        if model.config.text_config.to_dict() | {"dtype": None} != config.text_config.to_dict() | {"dtype": None}:
            raise SystemExit(f"{init} is not a {name} checkpoint (its config differs)")
        earlier = json.loads((init / "training.json").read_text())
    vocab = model.config.text_config.vocab_size
    params = [p for n, p in model.named_parameters() if "vision" not in n]
    print(f"{name}: {sum(p.numel() for p in params) / 1e6:.2f} M parameters, canvas {canvas}", flush=True)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s / steps, 1)))))
    started, running = time.perf_counter(), None

    def save(done: int) -> None:
        # canvas256 ships in bf16 to stay small in git; tiny's 1.5 M parameters stay float32
        copy.deepcopy(model).eval().to(dtype).save_pretrained(staging, safe_serialization=True)
        # the published defaults; canvas256's `twice` answers fill two canvases
        generation = {**GENERATION_CONFIG, "max_new_tokens": max(GENERATION_CONFIG["max_new_tokens"], 2 * canvas)}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        (staging / "training.json").write_text(json.dumps(
            {"model": name, "steps": done, "of": steps, "seed": seed, "batch": batch, "lr": lr,
             "label_smoothing": label_smoothing, "canvas_length": canvas,
             "tasks": sorted(TASKS) if name == "tiny" else list(prose.KINDS),
             "seconds": round(time.perf_counter() - started),
             **({"init": earlier, "focus": focus} if init is not None else {})}, indent=2) + "\n")

    for step in range(steps):
        inputs, targets = make_batch(rows(rng, codec, batch, excluded), rng, canvas)
        noisy = add_noise(targets, vocab, generator)
        self_conditioning = None
        if torch.rand(1, generator=generator).item() < 0.5:
            with torch.no_grad():
                temperature = 0.4 + 0.4 * torch.rand(1, generator=generator).item()
                self_conditioning = model(input_ids=inputs, decoder_input_ids=noisy).logits / temperature
        logits = model(input_ids=inputs, decoder_input_ids=noisy, self_conditioning_logits=self_conditioning).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1),
                                               label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}/{steps}  loss {running:.4f}  lr {schedule.get_last_lr()[0]:.2e}  "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        if (step + 1) % save_every == 0 and step + 1 < steps:
            save(step + 1)  # a snapshot in the staging folder, so an interrupted run still leaves a model to try

    save(steps)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/train_demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--out", type=Path, help="checkpoint folder (default: the model's in export/demo)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=500, help="steps between snapshots in OUT.partial")
    parser.add_argument("--init", type=Path, help="start from this checkpoint (same model) instead of random weights")
    parser.add_argument("--focus", choices=prose.KINDS, help="half of the batches of this kind (canvas256)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="of the loss (a fine-tune's)")
    args = parser.parse_args(argv)
    steps, batch, lr = MODELS[args.model][2:]
    out = args.out or (DEMO_CHECKPOINT if args.model == "tiny" else DEMO_CHECKPOINT.parent / args.model)
    torch.set_num_threads(2)
    train(args.model, out, args.steps or steps, args.seed, args.batch or batch, args.lr or lr, args.save_every,
          args.init, args.focus, args.label_smoothing)
    if args.model in CALIBRATION and args.init is None and args.steps is None:
        steps, lr, label_smoothing = CALIBRATION[args.model]
        train(args.model, out, steps, args.seed, args.batch or batch, lr, args.save_every, out, None, label_smoothing)


if __name__ == "__main__":
    main()
