"""Print the `benchmark_app` line that times one denoising step of an artifact with OpenVINO's own tool.

    python bench/benchmark_app.py ARTIFACT [--past 1000] [-d CPU] [--run]

The IR (`model.xml`) reads its weights from `model.bin` beside it, so `benchmark_app -m model.xml` needs no
weights path; it needs the shapes of one call, which this derives from the manifest: a canvas of
`canvas_length` tokens denoised over a cache of `--past` tokens (sliding layers hold at most their window).
benchmark_app fills the inputs with random values; its latency is the step's graph time without the runtime's
host side (bench/profile_step.py has the per-component breakdown).
"""

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from dg_runtime.artifact import load_manifest


def step_shapes(manifest: dict, past: int) -> dict[str, list[int]]:
    """Each input's shape in a denoising step of batch 1 over `past` cached tokens."""
    model = manifest["model"]
    sizes = {"batch": 1, "tokens": model["canvas_length"], "soft_tokens": model["canvas_length"],
             "head_tokens": model["canvas_length"], "past_full": past,
             "past_sliding": min(past, model["sliding_window"])}
    return {entry["name"]: [sizes[d] if isinstance(d, str) else d for d in entry["shape"]]
            for entry in manifest["graphs"]["model"]["inputs"]}


def command(artifact: Path, past: int, device: str) -> list[str]:
    manifest = load_manifest(artifact)
    shapes = ",".join(f"{name}[{','.join(map(str, shape))}]" for name, shape in step_shapes(manifest, past).items())
    hint = ["-hint", "latency"] if device != "NPU" else []
    return ["benchmark_app", "-m", str(artifact / manifest["formats"]["openvino"]["graphs"]["model"]), "-d", device,
            "-data_shape", shapes, *hint, "-niter", "10"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/benchmark_app.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--past", type=int, default=1000, help="cached tokens before the canvas (default 1000)")
    parser.add_argument("-d", "--device", default="CPU")
    parser.add_argument("--run", action="store_true", help="run the line (benchmark_app is in the openvino wheel)")
    args = parser.parse_args(argv)
    line = command(args.artifact, args.past, args.device)
    print(shlex.join(line), flush=True)
    if args.run:
        if shutil.which("benchmark_app") is None:
            sys.exit("benchmark_app is not on PATH: pip install openvino")
        sys.exit(subprocess.run(line).returncode)


if __name__ == "__main__":
    main()
