"""The published 26B's shape end to end on this machine, and diffusion against autoregressive decoding on it.

    python bench/benchmark_real_shape.py [--config FOLDER] [--reuse] [--backends onnxruntime,openvino]

Streams deterministic random weights of the config (default: the published DiffusionGemma 26B-A4B's, from
tests/fixtures) into a cpu-int4-mixed artifact in the cache, then, in a fresh process per backend: loads it,
prefills a 1,000-token prompt, denoises one full 256-token block with the artifact's default settings, encodes
the committed block, and times one-token autoregressive steps (the encoder and the LM head: the same weights
run token by token). Random weights never become confident, so the block runs every step it is allowed; the
tokens/s columns therefore use the steps per block that published runs of the trained model report (15-34),
stated beside the figures. `--reuse` keeps an artifact exported before (and the export figures saved with it).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dg_export.builtin import cache_dir

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "diffusiongemma-26b-a4b-it"
RECIPE = "cpu-int4-mixed"
PROMPT_TOKENS = 1000
STEPS_PER_BLOCK = (15, 34)  # published runs of the trained model: 7.5-17 tokens accepted per forward
AR_STEPS = 5


def export(config: Path, artifact: Path) -> dict:
    """Export in a child process; its wall time and peak RSS."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dg_export.cli", f"synthetic:{config}", "--recipe", RECIPE,
                    "-o", str(artifact), "--overwrite"], check=True)
    figures = {"export_s": time.perf_counter() - started,
               "export_peak_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
    Path(f"{artifact}.export.json").write_text(json.dumps(figures))
    return figures


def measure(artifact: str, backend: str) -> dict:
    """Run in a fresh process: every runtime figure of one backend."""
    from dg_runtime import DiffusionGemma

    def resident() -> int:
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("VmRSS", "VmHWM")))
        return {k: int(v.split()[0]) * 1024 for k, v in status.items()}

    started = time.perf_counter()
    model = DiffusionGemma(artifact, backend=backend, verify=True, memory_upkeep=True)  # as dg-run loads
    loaded = resident()
    figures = {"load_s": time.perf_counter() - started, "rss_after_load": loaded["VmRSS"], "load_peak": loaded["VmHWM"]}
    rng = np.random.default_rng(0)
    cache = model.new_cache(1)
    started = time.perf_counter()
    model.graph.encode(cache, rng.integers(3, model.vocab_size, (1, PROMPT_TOKENS - 1)))
    figures["prefill_s"] = time.perf_counter() - started
    figures["rss_after_prefill"] = resident()["VmRSS"]

    settings = model.defaults.with_overrides(max_new_tokens=model.canvas_length)
    for event in model.stream(rng.integers(3, model.vocab_size, (1, 1)), settings=settings, seed=0, cache=cache):
        pass
    figures.update(steps=event.stats.steps_per_block[0], step_s=event.stats.step_ms / 1000,
                   max_steps=settings.max_denoising_steps)
    started = time.perf_counter()
    token = model.graph.encode(cache, event.tokens)  # what the next block would start with
    figures["encode_block_s"] = time.perf_counter() - started
    ar_steps = []
    for _ in range(AR_STEPS):
        started = time.perf_counter()
        token = model.graph.encode(cache, token[:, None])
        ar_steps.append(time.perf_counter() - started)
    figures["ar_step_s"] = statistics.median(ar_steps)
    figures["peak_rss"] = resident()["VmHWM"]
    return figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/benchmark_real_shape.py")
    parser.add_argument("--config", type=Path, default=FIXTURE, help="a folder with a DiffusionGemma config.json")
    parser.add_argument("--reuse", action="store_true", help="use the artifact exported before, if there is one")
    parser.add_argument("--backends", default="onnxruntime,openvino")
    parser.add_argument("--worker", nargs=2, metavar=("ARTIFACT", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(*args.worker)))
        return

    artifact = cache_dir() / f"{args.config.resolve().name}-{RECIPE}.dg"
    saved = Path(f"{artifact}.export.json")
    if args.reuse and (artifact / "manifest.json").is_file() and saved.is_file():
        exported = json.loads(saved.read_text())
    else:
        exported = export(args.config, artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    weights = manifest["weights"]["stored_bytes"]
    size = sum(p.stat().st_size for p in artifact.iterdir() if p.is_file())
    rows = {}
    for backend in args.backends.split(","):
        result = subprocess.run([sys.executable, __file__, "--worker", str(artifact),
                                 backend], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{backend} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
        rows[backend] = json.loads(result.stdout.splitlines()[-1])

    gb = 1e9
    print(f"\n{args.config.name}, synthetic weights, {RECIPE}: export {exported['export_s'] / 60:.1f} min at peak RSS "
          f"{exported['export_peak_bytes'] / gb:.2f} GB; artifact {size / gb:.2f} GB ({weights / gb:.2f} GB of "
          f"weights; runtime memory limit 1.2 x weights + 0.3 GB = {(1.2 * weights + 0.3 * gb) / gb:.2f} GB)\n")
    s_low, s_high = STEPS_PER_BLOCK
    print(f"| backend | load s | RSS after load GB | peak while loading GB | RSS after prefill GB | peak RSS GB "
          f"| prefill {PROMPT_TOKENS} tokens s | denoiser step s "
          f"| steps in the block | encode 256 s | autoregressive step s | diffusion tok/s at {s_low} / {s_high} "
          "steps per block | autoregressive tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for backend, r in rows.items():
        per_block = [(s * r["step_s"] + r["encode_block_s"]) for s in STEPS_PER_BLOCK]
        canvas = manifest["model"]["canvas_length"]
        print(f"| {backend} | {r['load_s']:.1f} | {r['rss_after_load'] / gb:.2f} | {r['load_peak'] / gb:.2f} | "
              f"{r['rss_after_prefill'] / gb:.2f} | {r['peak_rss'] / gb:.2f} | "
              f"{r['prefill_s']:.3g} | {r['step_s']:.3g} | {r['steps']} of {r['max_steps']} | "
              f"{r['encode_block_s']:.3g} | {r['ar_step_s']:.3g} | {canvas / per_block[0]:.3g} / {canvas / per_block[1]:.3g} "
              f"| {1 / r['ar_step_s']:.3g} |")


if __name__ == "__main__":
    main()
