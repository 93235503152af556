"""Benchmark: the exported graphs and the runtime loop against transformers, measured in the same run.

    python -m dg_export.benchmark [--size tiny|medium] [--threads 2]

Uses the embedded demo model (tiny) or builds a seeded medium stand-in, exports it once (cached) with the
cpu-fp32, cpu-int8 and cpu-int4-mixed recipes, then prints a Markdown table: the denoiser step (median ms, same
inputs) and whole generations (same prompts, same noise, default generation settings) for transformers, ONNX
Runtime, OpenVINO f32 and bf16 and the quantized artifacts on both backends, with ratios to transformers and to
the same backend's fp32 artifact, the share of tokens identical to transformers', the weights' size and the
runtime's peak RSS (a fresh process loading the artifact and generating).
"""

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dg_runtime import DiffusionGemma, NoiseSource
from dg_runtime.graph import STEP_OUTPUTS

from . import reference
from .builtin import TEXT_CONFIG, build_checkpoint, builtin_checkpoint, cache_dir
from .cli import main as dg_export

# A larger stand-in with the real model's proportions where it matters for speed: 5 sliding : 1 full layers,
# many experts with top-k routing, a canvas of 256.
MEDIUM = {
    **TEXT_CONFIG,
    "vocab_size": 264, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 6,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"], "num_attention_heads": 8,
    "num_key_value_heads": 4, "head_dim": 64, "global_head_dim": 128, "num_global_key_value_heads": 1,
    "num_experts": 32, "top_k_experts": 4, "moe_intermediate_size": 256, "sliding_window": 128,
}
# (recipe, backend, OpenVINO precision)
RUNS = [("cpu-fp32", "onnxruntime", None), ("cpu-fp32", "openvino", "f32"), ("cpu-fp32", "openvino", "bf16"),
        ("cpu-int8", "onnxruntime", None), ("cpu-int8", "openvino", None),
        ("cpu-int4-mixed", "onnxruntime", None), ("cpu-int4-mixed", "openvino", None)]
PEAK_RSS = """
import sys, numpy as np
from dg_runtime import DiffusionGemma
model = DiffusionGemma(sys.argv[1], sys.argv[2], threads=int(sys.argv[3]), precision=sys.argv[4] or None)
model.generate(np.arange(5, 45)[None] % model.vocab_size, seed=0)
print([line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1])
"""


def checkpoint_for(size: str) -> Path:
    if size == "tiny":
        return builtin_checkpoint()
    folder = cache_dir() / "bench-medium"
    if not (folder / "config.json").is_file():
        # A wider tied embedding makes the distributions peaked, as a trained model's are, so that the
        # agreement column measures the backends rather than float near-ties of a near-uniform model.
        build_checkpoint(folder, MEDIUM, embedding_std=0.3)
    return folder


def median_ms(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dg_export.benchmark")
    parser.add_argument("--size", choices=["tiny", "medium"], default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed denoiser steps per backend")
    parser.add_argument("--seeds", type=int, default=3, help="generations per backend")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    checkpoint = checkpoint_for(args.size)
    artifacts = {}
    for recipe in dict.fromkeys(recipe for recipe, _, _ in RUNS):
        artifacts[recipe] = cache_dir() / f"bench-{args.size}-{recipe}.dg"
        if not (artifacts[recipe] / "manifest.json").is_file():
            # The wide embedding of the medium stand-in scales float32 rounding in the logits past 1e-4 (about
            # 2e-3); its fidelity is what the agreement column measures.
            validate = ["--no-validate"] if args.size == "medium" else []
            assert dg_export([str(checkpoint), "-o", str(artifacts[recipe]), "--overwrite", "--recipe", recipe,
                              *validate]) == 0
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, dtype=torch.float32).eval()
    runtimes = {(r, b, p): DiffusionGemma(artifacts[r], b, threads=args.threads, precision=p) for r, b, p in RUNS}
    first = next(iter(runtimes.values()))
    settings = first.defaults
    canvas, vocab = first.canvas_length, first.vocab_size
    params = sum(p.numel() for n, p in model.named_parameters() if "vision" not in n)

    # One denoiser step on identical inputs: a 40-token prompt in the cache, a random canvas, step-2 soft input.
    rng = np.random.default_rng(0)
    prompt = rng.integers(5, vocab, (1, 40))
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.text_config)
    reference.encode(model, cache, prompt, 0)
    canvas_ids = rng.integers(0, vocab, (1, canvas))
    positions = np.arange(40, 40 + canvas)[None]
    logits = rng.normal(0, 3, (1, canvas, vocab)).astype(np.float32)
    uniform = rng.random((1, canvas), dtype=np.float32)
    t = np.array(0.7, dtype=np.float32)
    step_ms = {"transformers": median_ms(
        lambda: reference.denoise(model, cache, canvas_ids, logits, positions, t, uniform), args.repeats)}
    soft = reference.soft_embedding(model, torch.from_numpy(logits)).numpy()
    for key, runtime in runtimes.items():
        kv = runtime.new_cache(1)
        runtime.graph.encode(kv, prompt)
        feeds = runtime.graph.denoiser_feeds(kv, canvas_ids, soft, positions, t, uniform)
        step_ms[key] = median_ms(lambda: runtime.graph.run(STEP_OUTPUTS, feeds), args.repeats)

    # Whole generations with the artifact's default settings and the same noise on every side.
    prompts = [rng.integers(5, vocab, (1, 24 + 7 * s)) for s in range(args.seeds)]
    results = {}
    started = time.perf_counter()
    expected, steps = [], []
    for seed, ids in enumerate(prompts):
        tokens, recorder = reference.generate_with_noise(model, ids, settings, NoiseSource(seed))
        expected.append(tokens[:, : settings.max_new_tokens])
        steps.append(len(recorder.logits))
    results["transformers"] = (time.perf_counter() - started, sum(steps), 1.0)
    for key, runtime in runtimes.items():
        started, same, total, n_steps = time.perf_counter(), 0, 0, 0
        for seed, ids in enumerate(prompts):
            done = runtime.generate(ids, settings, noise=NoiseSource(seed))
            n_steps += sum(done.stats.steps_per_block)
            want = expected[seed][:, : done.tokens.shape[1]]
            width = min(want.shape[1], done.tokens.shape[1])
            same += int((want[:, :width] == done.tokens[:, :width]).sum())
            total += max(want.shape[1], done.tokens.shape[1])
        results[key] = (time.perf_counter() - started, n_steps, same / total)

    name = "embedded demo model" if args.size == "tiny" else "medium stand-in (seeded random weights)"
    print(f"\n{name}: {params / 1e6:.1f} M text parameters, canvas {canvas}, "
          f"{args.threads} threads, {args.seeds} generations of up to {settings.max_new_tokens} tokens "
          f"(max {settings.max_denoising_steps} steps/block)\n")
    print("| runtime | weights MB | denoiser step ms | vs transformers | vs same backend fp32 | generation s | steps | "
          "tokens identical to transformers | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_step = step_ms["transformers"]
    seconds, n_steps, agree = results["transformers"]
    print(f"| transformers (PyTorch, fp32) | {4 * params / 1e6:.0f} | {base_step:.1f} | 1.00x | | {seconds:.2f} | "
          f"{n_steps} | {agree * 100:.1f} % | |")
    for key in runtimes:
        recipe, backend, precision = key
        fp32_step = step_ms[("cpu-fp32", backend, None if backend == "onnxruntime" else "f32")]
        seconds, n_steps, agree = results[key]
        weights = (artifacts[recipe] / "weights.bin").stat().st_size
        print(f"| {recipe} on {backend}{' ' + precision if precision else ''} | {weights / 1e6:.0f} | "
              f"{step_ms[key]:.1f} | {base_step / step_ms[key]:.2f}x | {fp32_step / step_ms[key]:.2f}x | {seconds:.2f} | "
              f"{n_steps} | {agree * 100:.1f} % | {peak_rss(artifacts[recipe], backend, precision, args.threads) / 1e6:.0f} |")


def peak_rss(artifact, backend: str, precision: str | None, threads: int) -> int:
    """Bytes: the peak RSS of a fresh process that loads the artifact and generates one default answer."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(artifact), backend, str(threads), precision or ""],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) * 1024


if __name__ == "__main__":
    main()
