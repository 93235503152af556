"""The vision tower of a config on synthetic weights: its graph built and streamed like an export's at fp32 and at
int8, one image encoded and timed on both backends, and the int8 tower's features compared with the fp32 tower's.

    python bench/vision_tower.py [--config tests/fixtures/diffusiongemma-26b-a4b-it] [--tower FILE.json]
                                 [--tokens 280] [--repeats 3] [--export]

Builds the vision graph (export/vision.py) of the config's tower (or of the vision_config in `--tower`) with seeded
random weights (SyntheticCheckpoint) into a folder in the cache, once per tower format, converts it for OpenVINO,
then per backend and format: the first call (compile and weight packing included), the median of `--repeats`
more for one image of `--tokens` soft tokens (a grid of rows x columns patches, its pooled blocks as square as the
count allows), and the int8 features' relative error ||int8 - fp32|| / ||fp32|| on that backend.

`--export` instead runs the exporter itself on the tower: a checkpoint of the demo's text model with this tower
(synthetic bf16 weights) is written to the cache and exported with dg-export's by-layer validation (every tower
layer against transformers' own modules, both backends), and one image is encoded through the runtime.

The published 26B's config in tests/fixtures has no vision_config, so transformers' default tower (768 wide, 16
layers) stands in unless `--tower` names one; bench/towers/gemma4-large-assumed.json is the 1152-wide, 27-layer
tower public write-ups give the 26B (~550 M parameters; not checked against the published config).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

TOWER_FORMATS = ("fp32", "int8")
FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "diffusiongemma-26b-a4b-it"


def grid(tokens: int) -> tuple[int, int]:
    """(rows, columns) of pooled blocks: the most square factorisation of `tokens`."""
    rows = max(r for r in range(1, int(tokens ** 0.5) + 1) if tokens % r == 0)
    return rows, tokens // rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/vision_tower.py")
    parser.add_argument("--config", type=Path, default=FIXTURE)
    parser.add_argument("--tower", type=Path, help="a JSON vision_config to use instead of the config's")
    parser.add_argument("--tokens", type=int, default=280)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--export", action="store_true",
                        help="export a checkpoint with this tower through dg-export (by-layer validation) instead")
    args = parser.parse_args(argv)

    import onnx

    from dg_export import openvino_graphs
    from dg_export.builtin import cache_dir
    from dg_export.plan import vision_parameters
    from dg_export.source import load_config
    from dg_export.synthetic import SyntheticCheckpoint
    from dg_export.vision import build_vision_model
    from dg_export.weights import WEIGHTS_FILE, Weights
    from dg_quantize.roles import Precision
    from dg_runtime.backends import OnnxRuntimeGraph, OpenVinoGraph

    config = load_config(args.config)
    if args.tower:
        from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

        config.vision_config = Gemma4VisionConfig(**json.loads(args.tower.read_text()))
    vision = config.vision_config
    name = f"{args.config.name}-{args.tower.stem if args.tower else 'default'}"
    if args.export:
        export_tower(vision, name)
        return
    built = {}
    for tower_format in TOWER_FORMATS:
        folder = cache_dir() / f"bench-vision-{name}-{tower_format}"
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        precision = Precision("fp32", vision=tower_format)
        weights = Weights(folder / WEIGHTS_FILE, SyntheticCheckpoint(config, "fp32", images=True), precision)
        try:
            graphs = {target: build_vision_model(config, weights, target) for target in ("onnx", "openvino")}
        finally:
            weights.close()
        onnx.save(graphs["onnx"], str(folder / "vision.onnx"))
        openvino_graphs.convert(graphs["openvino"], folder / "vision.xml", folder / WEIGHTS_FILE)
        built[tower_format] = (folder, time.perf_counter() - started, (folder / WEIGHTS_FILE).stat().st_size)

    k, p = vision.pooling_kernel_size, vision.patch_size
    rows, columns = (k * n for n in grid(args.tokens))
    column, row = np.meshgrid(np.arange(columns), np.arange(rows), indexing="xy")
    feeds = {"pixel_values": np.random.default_rng(0).random((1, rows * columns, 3 * p * p), dtype=np.float32),
             "pixel_positions": np.stack([column.ravel(), row.ravel()], axis=1)[None].astype(np.int64)}
    counts = vision_parameters(config)
    print(f"\n{name}: vision tower {vision.hidden_size} wide, {vision.num_hidden_layers} layers, "
          f"{counts['total'] / 1e6:.0f} M parameters; one image of {args.tokens} tokens ({rows} x {columns} patches), "
          f"{args.threads} threads; " + ", ".join(f"{f} built and streamed in {t:.0f} s ({size / 1e9:.2f} GB)"
                                                  for f, (_, t, size) in built.items()) + "\n")
    print("| backend | tower | first call (s) | per image (s, median) | features vs fp32 |")
    print("|---|---|---:|---:|---:|")
    for backend in ("onnxruntime", "openvino"):
        features = {}
        for tower_format, (folder, _, _) in built.items():
            started = time.perf_counter()
            session = (OnnxRuntimeGraph(folder / "vision.onnx", args.threads) if backend == "onnxruntime" else
                       OpenVinoGraph(folder / "vision.xml", folder / WEIGHTS_FILE, "CPU", None, "f32", args.threads))
            session.run(["image_features"], feeds)
            first = time.perf_counter() - started
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                (features[tower_format],) = session.run(["image_features"], feeds)
                times.append(time.perf_counter() - started)
            assert features[tower_format].shape == (1, args.tokens, config.text_config.hidden_size)
            error = np.linalg.norm(features[tower_format] - features["fp32"]) / np.linalg.norm(features["fp32"])
            print(f"| {backend} | {tower_format} | {first:.2f} | {statistics.median(times):.2f} | "
                  f"{'-' if tower_format == 'fp32' else f'{error:.2e}'} |")
            del session


def export_tower(vision, name: str) -> None:
    """dg-export on a checkpoint of the demo's text model with this tower; the tower's validation rows, its size
    and one 640 x 480 picture through the runtime (preprocessed to the processor's token budget) on both backends."""
    from PIL import Image
    from transformers import DiffusionGemmaConfig

    from dg_export import export
    from dg_export.builtin import TEXT_CONFIG, cache_dir
    from dg_export.synthetic import write_checkpoint
    from dg_runtime import DiffusionGemma

    config = DiffusionGemmaConfig(text_config=TEXT_CONFIG, vision_config=vision.to_dict(), canvas_length=32,
                                  boi_token_id=261, image_token_id=262, eoi_token_id=263)  # inside the demo's vocabulary
    checkpoint = cache_dir() / f"bench-vision-{name}-checkpoint"
    started = time.perf_counter()
    write_checkpoint(checkpoint, config, images=True)
    written = time.perf_counter() - started
    started = time.perf_counter()
    artifact = export(checkpoint, cache_dir() / f"bench-vision-{name}.dg", overwrite=True, validation="by-layer")
    exported = time.perf_counter() - started
    manifest = json.loads((artifact / "manifest.json").read_text())
    rows = [row for row in manifest["validation"]["results"] if row["graph"].startswith("vision.")]
    worst = max(rows, key=lambda row: row["diff"] / max(row["bound"], 1e-30))
    print(f"\n{name}: checkpoint written in {written:.0f} s, exported in {exported:.0f} s "
          f"({(artifact / 'model.bin').stat().st_size / 1e9:.2f} GB weights); {len(rows)} vision rows validated by "
          f"layer against transformers, all ok: {all(row['ok'] for row in rows)}; worst {worst['backend']} "
          f"{worst['graph']} {worst['diff']:.1e} (allowed {worst['bound']:.1e})")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    for backend in ("onnxruntime", "openvino"):
        model = DiffusionGemma(artifact, backend=backend)
        model.image_features([picture])
        started = time.perf_counter()
        features, counts = model.image_features([picture])
        print(f"  {backend}: one {picture.width} x {picture.height} picture, {counts[0]} image tokens, "
              f"{time.perf_counter() - started:.2f} s (after a first call)")


if __name__ == "__main__":
    main()
