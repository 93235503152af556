"""Benchmark: dg-export at the published model's depth, with synthetic checkpoints streamed from disk.

    python bench/benchmark_export.py [--only real-depth|memory]

real-depth  the published config's 30-layer pattern, 128 experts top-8, head layout and 262,144-token vocabulary
            with narrow widths: export time (both formats, validated), session creation / compilation of the graph,
            and one denoiser step on each backend.
memory      two checkpoints of that depth whose bf16 sizes differ about 4x (the larger over 4 GB, sharded): the
            exporter's peak RSS on each against the plan `--dry-run` prints, and how much of the added bytes the
            peak grew by.

Checkpoints are written once into the cache folder (~7 GB in all) and reused.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dg_export.builtin import cache_dir

PUBLISHED = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "diffusiongemma-26b-a4b-it" / "config.json"
NARROW = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 64}
MEMORY_PAIR = {"small": {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128},
               "large": {"hidden_size": 512, "intermediate_size": 1024, "moe_intermediate_size": 320}}


def checkpoint(name: str, overrides: dict) -> Path:
    from dg_export.synthetic import standin_config, write_checkpoint

    folder = cache_dir() / f"standin-{name}"
    if not (folder / "config.json").is_file():
        print(f"writing the {name} stand-in checkpoint to {folder} ...", file=sys.stderr, flush=True)
        # A peaked embedding (logits of std ~5), so that token outputs are not decided by float near-ties.
        write_checkpoint(folder, standin_config(PUBLISHED, overrides), shard_bytes=1 << 30,
                         embedding_std=5 / overrides["hidden_size"] ** 0.5)
    return folder


# The child reports its own VmHWM: rusage's maxrss survives fork and exec, so a child of a large process would
# report its parent's size.
REPORT_PEAK = """
import os, runpy
try:
    runpy.run_module("dg_export.cli", run_name="__main__")
finally:
    status = open("/proc/self/status").read()
    peak_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    open(os.environ["DG_PEAK_REPORT"], "w").write(str(peak_kb))
"""


def measured_export(folder: Path, out: Path, *args: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one `dg-export` process."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "peak"
        command = [sys.executable, "-c", REPORT_PEAK, str(folder), "-o", str(out), "--overwrite", *args]
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "DG_PEAK_REPORT": str(report)})
        if result.returncode != 0:
            raise SystemExit(f"dg-export failed on {folder}:\n{result.stderr[-2000:]}")
        return time.perf_counter() - started, int(report.read_text()) * 1024 / 1e9


def bf16_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def planned(folder: Path) -> dict:
    from dg_export.plan import count_parameters, export_estimate
    from dg_export.source import load_config

    config = load_config(folder)
    return export_estimate(config, count_parameters(config))


def real_depth() -> None:
    from dg_runtime.artifact import load_manifest
    from dg_runtime.backends import open_graph

    folder = checkpoint("real-depth", NARROW)
    out = cache_dir() / "standin-real-depth.dg"
    seconds, peak = measured_export(folder, out)
    manifest = load_manifest(out, verify_checksums=False)
    from dg_export.plan import count_parameters
    from dg_export.source import load_config

    params = count_parameters(load_config(folder))["total"]
    print(f"\n*real-depth stand-in: {params / 1e6:.0f} M text parameters (30 layers, 128 experts top-8, vocabulary "
          f"262,144, hidden {NARROW['hidden_size']}), {bf16_bytes(folder) / 1e9:.2f} GB bf16 in shards*\n")
    print(f"export, both formats, {manifest['validation']['mode']} validation: {seconds:.0f} s, peak RSS {peak:.2f} GB\n")
    print("| backend | load s | graph nodes | denoiser step ms |")
    print("|---|---:|---:|---:|")
    import onnx

    nodes = len(onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)
    for backend in ("onnxruntime", "openvino"):
        started = time.perf_counter()
        session = open_graph(out, manifest, backend, precision="f32")
        load = time.perf_counter() - started
        print(f"| {backend} | {load:.1f} | {nodes} | {denoiser_step_ms(session, manifest):.0f} |", flush=True)
        del session


def denoiser_step_ms(session, manifest: dict, past: int = 64, repeats: int = 5) -> float:
    """Median ms of a denoising step over a random canvas after `past` random tokens were encoded."""
    from dg_runtime.graph import STEP_OUTPUTS, ModelGraph
    from dg_runtime.kv_cache import KVCache

    model = manifest["model"]
    canvas, hidden = model["canvas_length"], model["hidden_size"]
    rng = np.random.default_rng(0)
    graph = ModelGraph(session, hidden)
    cache = KVCache(model["kv_layout"], model["sliding_window"], 1)
    graph.encode(cache, rng.integers(0, model["vocab_size"], (1, past)))
    feeds = graph.denoiser_feeds(cache, rng.integers(0, model["vocab_size"], (1, canvas)),
                                 np.zeros((1, canvas, hidden), np.float32), np.arange(past, past + canvas)[None],
                                 np.array(0.8, np.float32), rng.random((1, canvas), dtype=np.float32))
    session.run(STEP_OUTPUTS, feeds)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(STEP_OUTPUTS, feeds)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def memory() -> None:
    rows = []
    for name, overrides in MEMORY_PAIR.items():
        folder = checkpoint(f"memory-{name}", overrides)
        seconds, peak = measured_export(folder, cache_dir() / f"standin-memory-{name}.dg")
        rows.append((name, bf16_bytes(folder), seconds, peak, planned(folder)))
    print("\n*dg-export peak RSS on two checkpoints of the published depth (30 layers, 128 experts, vocabulary "
          "262,144), both formats, default validation*\n")
    print("| checkpoint | bf16 GB | export s | peak RSS GB | planned GB (validation) | peak / checkpoint |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, size, seconds, peak, plan in rows:
        print(f"| {name} | {size / 1e9:.2f} | {seconds:.0f} | {peak:.2f} | {plan['peak_gb']:.2f} ({plan['validation']}) "
              f"| {peak * 1e9 / size:.0%} |")
    (_, small, _, small_peak, _), (_, large, _, large_peak, _) = rows
    print(f"\npeak grew by {(large_peak - small_peak) * 1e9 / (large - small):.1%} of the added "
          f"{(large - small) / 1e9:.2f} GB (checkpoint {large / small:.1f}x larger)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/benchmark_export.py")
    parser.add_argument("--only", choices=["real-depth", "memory"])
    args = parser.parse_args(argv)
    if args.only in (None, "real-depth"):
        real_depth()
    if args.only in (None, "memory"):
        memory()


if __name__ == "__main__":
    main()
