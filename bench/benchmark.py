"""Benchmark: the exported graphs and the runtime loop against transformers, measured in the same run.

    python bench/benchmark.py [--size tiny|canvas256|medium] [--threads 2]

Uses an embedded demo model (tiny, or canvas256: the published 256-token canvas) or builds a seeded medium stand-in, exports it once (cached) with the
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
from dg_runtime.backends import PEAK_OVER_WEIGHTS, WORKING_BYTES
from dg_runtime.graph import STEP_OUTPUTS, WARMUP_RUNS

from dg_export import export, reference
from dg_export.builtin import TEXT_CONFIG, build_checkpoint, builtin_checkpoint, cache_dir

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
FRESH_PROCESS = """
import sys, numpy as np
from dg_runtime import DiffusionGemma
model = DiffusionGemma(sys.argv[1], backend=sys.argv[2], threads=int(sys.argv[3]), precision=sys.argv[4] or None,
                       memory_upkeep=True)  # as dg-run and dg-serve load
model.generate(np.arange(5, 45)[None] % model.vocab_size, seed=0)
print(model.load_ms, [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1])
"""


def checkpoint_for(size: str) -> Path:
    if size != "medium":
        return builtin_checkpoint(f"builtin:{size}")
    folder = cache_dir() / "bench-medium"
    if not (folder / "config.json").is_file():
        # A wider tied embedding makes the distributions peaked, as a trained model's are, so that the
        # agreement column measures the backends rather than float near-ties of a near-uniform model.
        build_checkpoint(folder, MEDIUM, embedding_std=0.3)
    return folder


def is_current(artifact: Path, checkpoint: Path) -> bool:
    """A cached artifact of this exporter's format, exported after the checkpoint's weights last changed (an older
    one is exported again)."""
    import json

    from dg_runtime.artifact import FORMAT_VERSION

    manifest = artifact / "manifest.json"
    return (manifest.is_file() and json.loads(manifest.read_text()).get("format_version") == FORMAT_VERSION
            and manifest.stat().st_mtime >= max(f.stat().st_mtime for f in checkpoint.glob("*.safetensors")))


def median_ms(run, repeats: int) -> float:
    for _ in range(WARMUP_RUNS):  # past the runtime's warm-up, which releases mapped weight pages as it runs
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/benchmark.py")
    parser.add_argument("--size", choices=["tiny", "canvas256", "medium"], default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed denoiser steps per backend")
    parser.add_argument("--seeds", type=int, default=3, help="generations per backend")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    checkpoint = checkpoint_for(args.size)
    artifacts = {}
    for recipe in dict.fromkeys(recipe for recipe, _, _ in RUNS):
        artifacts[recipe] = cache_dir() / f"bench-{args.size}-{recipe}.dg"
        if not is_current(artifacts[recipe], checkpoint):
            # The wide embedding of the medium stand-in scales float32 rounding in the logits past 1e-4 (about
            # 2e-3); its fidelity is what the agreement column measures.
            export(checkpoint, artifacts[recipe], recipe=recipe, overwrite=True,
                   validation=None if args.size == "medium" else "auto")
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, dtype=torch.float32).eval()
    runtimes = {(r, b, p): DiffusionGemma(artifacts[r], backend=b, threads=args.threads, precision=p, memory_upkeep=True)
                for r, b, p in RUNS}
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
    if args.size != "medium":  # the demo model's own kind of problem, so that answers (and tokens/s) mean something
        from dg_export.demo import problems

        prompts = [np.array([first.prompt_ids(text)]) for text, _, _ in problems(args.size, 12345, args.seeds)]
    else:
        prompts = [rng.integers(5, vocab, (1, 24 + 7 * s)) for s in range(args.seeds)]
    results = {}
    started = time.perf_counter()
    expected, steps = [], []
    for seed, ids in enumerate(prompts):
        tokens, recorder = reference.generate_with_noise(model, ids, settings, NoiseSource(seed))
        expected.append(tokens[:, : settings.max_new_tokens])
        steps.append(len(recorder.logits))
    results["transformers"] = (time.perf_counter() - started, sum(steps), 1.0)
    decoding = {}  # after the prompt: (tokens, seconds, blocks)
    for key, runtime in runtimes.items():
        started, same, total, n_steps = time.perf_counter(), 0, 0, 0
        tokens, seconds, blocks = 0, 0.0, 0
        for seed, ids in enumerate(prompts):
            generation_started = time.perf_counter()
            done = runtime.generate(ids, settings=settings, noise=NoiseSource(seed))
            tokens, blocks = tokens + done.stats.tokens, blocks + done.stats.blocks
            seconds += time.perf_counter() - generation_started - done.stats.prefill_ms / 1000
            n_steps += sum(done.stats.steps_per_block)
            want = expected[seed][:, : done.tokens.shape[1]]
            width = min(want.shape[1], done.tokens.shape[1])
            same += int((want[:, :width] == done.tokens[:, :width]).sum())
            total += max(want.shape[1], done.tokens.shape[1])
        results[key] = (time.perf_counter() - started, n_steps, same / total)
        decoding[key] = (tokens, seconds, blocks)

    name = f"embedded demo model {args.size}" if args.size != "medium" else "medium stand-in (seeded random weights)"
    print(f"\n{name}: {params / 1e6:.1f} M text parameters, canvas {canvas}, "
          f"{args.threads} threads, {args.seeds} generations of up to {settings.max_new_tokens} tokens "
          f"(max {settings.max_denoising_steps} steps/block)\n")
    print("| runtime | weights MB | load s | denoiser step ms | vs transformers | vs same backend fp32 | generation s | "
          "steps | tokens identical to transformers | peak RSS MB (the memory check's prediction) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_step = step_ms["transformers"]
    seconds, n_steps, agree = results["transformers"]
    print(f"| transformers (PyTorch, fp32) | {4 * params / 1e6:.0f} | | {base_step:.1f} | 1.00x | | {seconds:.2f} | "
          f"{n_steps} | {agree * 100:.1f} % | |")
    for key in runtimes:
        recipe, backend, precision = key
        fp32_step = step_ms[("cpu-fp32", backend, None if backend == "onnxruntime" else "f32")]
        seconds, n_steps, agree = results[key]
        weights = (artifacts[recipe] / "model.bin").stat().st_size
        predicted = PEAK_OVER_WEIGHTS[backend, recipe != "cpu-fp32"] * weights + WORKING_BYTES
        load_ms, rss = fresh_process(artifacts[recipe], backend, precision, args.threads)
        print(f"| {recipe} on {backend}{' ' + precision if precision else ''} | {weights / 1e6:.0f} | "
              f"{load_ms / 1000:.2f} | {step_ms[key]:.1f} | {base_step / step_ms[key]:.2f}x | {fp32_step / step_ms[key]:.2f}x | "
              f"{seconds:.2f} | {n_steps} | {agree * 100:.1f} % | {rss / 1e6:.0f} ({predicted / 1e6:.0f}) |")

    # Diffusion against autoregressive decoding on the same weights: the encoder and the LM head one token at a
    # time (with the KV cache) is the autoregressive model. Both exclude the prompt's prefill.
    print("\ndecoding speed after the prompt, same weights (diffusion: the generations above, measured steps):\n")
    print("| runtime | diffusion tokens/s | steps per block | autoregressive step ms | autoregressive tokens/s | "
          "diffusion / autoregressive |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, runtime in runtimes.items():
        recipe, backend, precision = key
        tokens, seconds, blocks = decoding[key]
        ar_ms = autoregressive_step_ms(runtime, prompts[0], args.repeats)
        steps = results[key][1] / blocks
        print(f"| {recipe} on {backend}{' ' + precision if precision else ''} | {tokens / seconds:.1f} | "
              f"{steps:.1f} | {ar_ms:.2f} | {1000 / ar_ms:.1f} | {tokens / seconds / (1000 / ar_ms):.2f}x |")


def autoregressive_step_ms(runtime: DiffusionGemma, prompt: np.ndarray, repeats: int) -> float:
    """Median ms of one-token steps (encode one token with the KV cache, its argmax is the next token)."""
    cache = runtime.new_cache(1)
    token = runtime.graph.encode(cache, prompt)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        token = runtime.graph.encode(cache, token[:, None])
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def fresh_process(artifact, backend: str, precision: str | None, threads: int) -> tuple[float, int]:
    """(load ms, peak RSS bytes) of a fresh process that loads the artifact and generates one default answer."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(artifact), backend, str(threads),
                             precision or ""], capture_output=True, text=True, check=True)
    load_ms, rss_kb = result.stdout.split()[-2:]
    return float(load_ms), int(rss_kb) * 1024


if __name__ == "__main__":
    main()
