"""The denoising step of a 26B-wide stand-in, this tree against an earlier commit, in one run.

    python bench/compare_step.py [--base d3cb8a7] [--layers 6] [--steps 5] [--backends onnxruntime,openvino]
                                 [--openvino-bf16]

The earlier commit's packages are unpacked from git into the cache and imported instead of this tree's (a path of
links named dg_export, dg_runtime, ... put first); each side exports the same stand-in (the published config's
widths, 128 experts top-8, 262,144-token vocabulary, its first `--layers` layers, seeded random weights) with
`cpu-int4-mixed` and its own exporter. Per side and backend, in two fresh processes one after the other (a first
and a second start of the same artifact): load, prefill a 1,000-token prompt, then one block of the runtime's
8 warm-up steps plus `--steps` more, never stopping early; the step is the median time between the last steps'
drafts (the graph and the loop). Printed: load, prefill, step, and the ratio of the two sides' steps.
`--openvino-bf16` adds this tree's OpenVINO runs with bf16 inference precision (`precision="bf16"`).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "diffusiongemma-26b-a4b-it"
PACKAGES = {"dg_export": "export", "dg_runtime": "runtime", "dg_quantize": "quantize", "dg_recipes": "recipes",
            "dg_serve": "serve"}
PROMPT_TOKENS, WARMUP = 1000, 8

WORKER = """
import inspect, json, statistics, sys, time
import numpy as np
from dg_runtime import DiffusionGemma, Settings
artifact, backend, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
options = {"verify": False}  # both sides: no sha256 in the load time
if len(sys.argv) > 4:
    options["precision"] = sys.argv[4]
if "memory_upkeep" in inspect.signature(DiffusionGemma).parameters:
    options["memory_upkeep"] = True  # what the earlier code always did
started = time.perf_counter()
model = DiffusionGemma(artifact, backend=backend, **options)
load_s = time.perf_counter() - started
cache = model.new_cache(1)
started = time.perf_counter()
model.graph.encode(cache, np.random.default_rng(0).integers(3, model.vocab_size, (1, PROMPT_TOKENS)))
prefill_s = time.perf_counter() - started
settings = Settings(max_new_tokens=model.canvas_length, max_denoising_steps=WARMUP + steps,
                    stability_threshold=WARMUP + steps)  # no early stop: every step runs
marks = [time.perf_counter() for event in model.stream([[5]], settings=settings, seed=0, cache=cache)
         if type(event).__name__ == "Draft"]
walls = [b - a for a, b in zip(marks, marks[1:])][-steps:]
peak = int([line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]) * 1024
print(json.dumps({"load_s": load_s, "prefill_s": prefill_s, "step_s": statistics.median(walls), "peak_gb": peak / 1e9}))
""".replace("PROMPT_TOKENS", str(PROMPT_TOKENS)).replace("WARMUP", str(WARMUP))


def unpack(revision: str, into: Path) -> Path:
    """The revision's packages as importable names (links to its folders); returns the folder to put on the path."""
    site = into / "site"
    if not site.is_dir():
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(into / "tree", filter="data")
        site.mkdir(parents=True)
        for package, folder in PACKAGES.items():
            if (into / "tree" / folder).is_dir():
                (site / package).symlink_to(into / "tree" / folder)
    return site


def run(code_path: Path | None, *args: str) -> subprocess.CompletedProcess:
    """A child Python with `code_path` (or this tree, installed) first on its import path."""
    env = {**__import__("os").environ}
    if code_path is not None:
        env["PYTHONPATH"] = f"{code_path}:{env.get('PYTHONPATH', '')}"
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)


def stand_in(config_folder: Path, layers: int) -> None:
    from dg_export.synthetic import standin_config, write_config

    published = json.loads((FIXTURE / "config.json").read_text())["text_config"]
    write_config(config_folder, standin_config(FIXTURE / "config.json", {
        "num_hidden_layers": layers, "layer_types": published["layer_types"][:layers]}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/compare_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="d3cb8a7")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backends", default="onnxruntime,openvino")
    parser.add_argument("--openvino-bf16", action="store_true", help="also this tree's OpenVINO at bf16 precision")
    args = parser.parse_args(argv)
    from dg_export.builtin import cache_dir

    work = cache_dir() / f"compare-{args.base}"
    config = cache_dir() / f"compare-{args.layers}-layers"
    if not (config / "config.json").is_file():
        stand_in(config, args.layers)
    sides = {args.base: unpack(args.base, work), "this tree": None}
    rows = {}
    for side, code in sides.items():
        artifact = work / f"{'base' if code else 'head'}-{args.layers}.dg"
        if not (artifact / "manifest.json").is_file():
            print(f"exporting with {side} ...", file=sys.stderr, flush=True)
            export = run(code, "-m", "dg_export.cli", f"synthetic:{config}", "-o", str(artifact), "--recipe",
                         "cpu-int4-mixed", "--no-validate", "--overwrite")
            if export.returncode != 0:
                raise SystemExit(f"export with {side} failed:\n{export.stderr[-3000:]}")
        runs = [(backend, ()) for backend in args.backends.split(",")]
        if code is None and args.openvino_bf16:
            runs.append(("openvino", ("bf16",)))
        for backend, precision in runs:
            for start in ("first", "second"):
                print(f"{side}, {backend} {' '.join(precision)}, {start} start ...", file=sys.stderr, flush=True)
                done = run(code, "-c", WORKER, str(artifact), backend, str(args.steps), *precision)
                if done.returncode != 0:
                    raise SystemExit(f"{side} on {backend} failed:\n{done.stderr[-3000:]}")
                rows[side, " ".join((backend, *precision)), start] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n26B-wide stand-in, {args.layers} layers, cpu-int4-mixed, {PROMPT_TOKENS}-token prompt; step: median of "
          f"{args.steps} after {WARMUP} warm-up steps (graph and loop)\n")
    print("| code | backend | start | load s | prefill s | step s | step vs base |")
    print("|---|---|---|---:|---:|---:|---:|")
    for (side, backend, start), figures in rows.items():
        base = rows[args.base, backend.split()[0], "second"]["step_s"]
        print(f"| {side} | {backend} | {start} | {figures['load_s']:.1f} | {figures['prefill_s']:.1f} | "
              f"{figures['step_s']:.2f} | {base / figures['step_s']:.2f}x |")


if __name__ == "__main__":
    main()
