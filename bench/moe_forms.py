"""The routed experts in OpenVINO's two forms at the published model's depth: compile, prefill, step and memory.

    python bench/moe_forms.py [--layers 30] [--steps 3]

`sorted` (`cpu-int4-mixed` on OpenVINO: the pairs sorted by expert, one compressed FullyConnected per expert and
projection, 2 x 128 a layer) against `tiled` (`igpu-int4`: the MoE block OpenVINO's transformations turn into
GatherMatmuls, its form for iGPUs). The stand-in has the published config's depth and layer pattern, 128 experts
top-8 and 262,144-token vocabulary at narrow widths (hidden 256, expert width 64: bench/benchmark_export.py's
real-depth one), seeded random weights streamed into each recipe once (cached); each artifact runs in two fresh
processes (a first and a second start) through bench/compare_step.py's worker: load (compile), a 1,000-token
prefill (OpenVINO packs weights at first use), a step after the warm-up, peak RSS. OpenVINO CPU, f32.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_step import WORKER, run  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "diffusiongemma-26b-a4b-it"
NARROW = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 64}
RECIPES = {"sorted": "cpu-int4-mixed", "tiled": "igpu-int4"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/moe_forms.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    from dg_export import export
    from dg_export.builtin import cache_dir
    from dg_export.synthetic import standin_config, write_config

    config = cache_dir() / f"moe-forms-{args.layers}-layers"
    if not (config / "config.json").is_file():
        published = json.loads((FIXTURE / "config.json").read_text())["text_config"]
        write_config(config, standin_config(FIXTURE / "config.json", {
            **NARROW, "num_hidden_layers": args.layers, "layer_types": published["layer_types"][: args.layers]}))
    rows = {}
    for form, recipe in RECIPES.items():
        artifact = cache_dir() / f"moe-forms-{args.layers}-{recipe}.dg"
        if not (artifact / "manifest.json").is_file():
            export(f"synthetic:{config}", artifact, recipe=recipe, formats=["openvino"], overwrite=True,
                   validation=None)
        for start in ("first", "second"):
            print(f"{form}, {start} start ...", file=sys.stderr, flush=True)
            done = run(None, "-c", WORKER, str(artifact), "openvino", str(args.steps))
            if done.returncode != 0:
                raise SystemExit(f"{form} failed:\n{done.stderr[-3000:]}")
            rows[form, start] = json.loads(done.stdout.strip().splitlines()[-1])
            rows[form, start]["weights_gb"] = (artifact / "model.bin").stat().st_size / 1e9
    print(f"\nreal-depth stand-in ({args.layers} layers, 128 experts top-8, hidden 256, expert width 64, vocabulary "
          "262,144), OpenVINO CPU f32, 1,000-token prompt\n")
    print("| MoE form (recipe) | start | weights GB | load (compile) s | prefill s | step s | peak RSS GB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (form, start), r in rows.items():
        print(f"| {form} ({RECIPES[form]}) | {start} | {r['weights_gb']:.2f} | {r['load_s']:.1f} | {r['prefill_s']:.1f} | "
              f"{r['step_s']:.2f} | {r['peak_gb']:.2f} |")


if __name__ == "__main__":
    main()
