"""The vision tower of a config on synthetic weights: its graph built and streamed like an export's, one image encoded
and timed on both backends.

    python bench/vision_tower.py [--config tests/fixtures/diffusiongemma-26b-a4b-it] [--tokens 280] [--repeats 3]

Builds the vision graph (export/vision.py) of the config's tower with seeded random weights (SyntheticCheckpoint,
fp32), into a folder in the cache, converts it for OpenVINO, then per backend: the first call (compile and weight
packing included) and the median of `--repeats` more for one image of `--tokens` soft tokens (a grid of
rows x columns patches, its pooled blocks as square as the count allows). Note: the published 26B's config in
tests/fixtures has no vision_config, so transformers' default tower stands in (768 wide, 16 layers).
"""

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "diffusiongemma-26b-a4b-it"


def grid(tokens: int) -> tuple[int, int]:
    """(rows, columns) of pooled blocks: the most square factorisation of `tokens`."""
    rows = max(r for r in range(1, int(tokens ** 0.5) + 1) if tokens % r == 0)
    return rows, tokens // rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/vision_tower.py")
    parser.add_argument("--config", type=Path, default=FIXTURE)
    parser.add_argument("--tokens", type=int, default=280)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import onnx

    from dg_export import openvino_graphs
    from dg_export.builtin import cache_dir
    from dg_export.plan import vision_parameters
    from dg_export.source import load_config
    from dg_export.synthetic import SyntheticCheckpoint
    from dg_export.vision import build_vision_model
    from dg_export.weights import WEIGHTS_FILE, Weights
    from dg_runtime.backends import OnnxRuntimeGraph, OpenVinoGraph

    config = load_config(args.config)
    vision = config.vision_config
    folder = cache_dir() / f"bench-vision-{args.config.name}"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    weights = Weights(folder / WEIGHTS_FILE, SyntheticCheckpoint(config, "fp32", images=True))
    try:
        graphs = {target: build_vision_model(config, weights, target) for target in ("onnx", "openvino")}
    finally:
        weights.close()
    onnx.save(graphs["onnx"], str(folder / "vision.onnx"))
    openvino_graphs.convert(graphs["openvino"], folder / "vision.xml", folder / WEIGHTS_FILE)
    built = time.perf_counter() - started

    k, p = vision.pooling_kernel_size, vision.patch_size
    rows, columns = (k * n for n in grid(args.tokens))
    column, row = np.meshgrid(np.arange(columns), np.arange(rows), indexing="xy")
    feeds = {"pixel_values": np.random.default_rng(0).random((1, rows * columns, 3 * p * p), dtype=np.float32),
             "pixel_positions": np.stack([column.ravel(), row.ravel()], axis=1)[None].astype(np.int64)}
    counts = vision_parameters(config)
    print(f"\n{args.config.name}: vision tower {vision.hidden_size} wide, {vision.num_hidden_layers} layers, "
          f"{counts['total'] / 1e6:.0f} M parameters ({4 * counts['total'] / 1e9:.2f} GB fp32), built and streamed in "
          f"{built:.0f} s; one image of {args.tokens} tokens ({rows} x {columns} patches), {args.threads} threads\n")
    print("| backend | first call (s) | per image (s, median) |")
    print("|---|---:|---:|")
    for backend in ("onnxruntime", "openvino"):
        started = time.perf_counter()
        session = (OnnxRuntimeGraph(folder / "vision.onnx", args.threads) if backend == "onnxruntime" else
                   OpenVinoGraph(folder / "vision.xml", folder / WEIGHTS_FILE, "CPU", None, "f32", args.threads))
        session.run(["image_features"], feeds)
        first = time.perf_counter() - started
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            (features,) = session.run(["image_features"], feeds)
            times.append(time.perf_counter() - started)
        assert features.shape == (1, args.tokens, config.text_config.hidden_size)
        print(f"| {backend} | {first:.2f} | {statistics.median(times):.2f} |")


if __name__ == "__main__":
    main()
