"""dg-export MODEL -o OUT: trace, convert, validate and write a self-describing artifact folder atomically."""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dg_runtime.artifact import FORMAT_VERSION, GRAPH_NAMES, write_manifest
from dg_runtime.errors import UserError, run_cli

from . import __version__
from dg_quantize.roles import DEFAULT_GROUP, Precision
from dg_quantize.schemes import FORMATS as FORMATS_BY_NAME
from dg_quantize.source import ArtifactCheckpoint, is_artifact

from .builtin import BUILTIN_ID, builtin_checkpoint
from .recipes import DEFAULT_RECIPE, load_recipe
from .source import OPTIONAL_FILES, TOKENIZER_FILES, check_files, read_config, resolve

FORMATS = {"onnx": ["onnx"], "openvino": ["openvino"], "both": ["onnx", "openvino"]}
SYNTHETIC_PREFIX = "synthetic:"  # synthetic:CONFIG_FOLDER streams deterministic random weights of that shape
OWNER_FILE = ".dg-export.pid"  # in a staging folder while its export runs


def parse_args(argv, prog: str = "dg-export"):
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Export a DiffusionGemma checkpoint (hub id or local folder) to ONNX and/or OpenVINO.",
        allow_abbrev=False,
    )
    parser.add_argument("model", nargs="?", default=BUILTIN_ID,
                        help=f"hub id, checkpoint folder or fp32/fp16 artifact folder (default: {BUILTIN_ID}, the "
                             f"embedded tiny model); {SYNTHETIC_PREFIX}FOLDER streams random weights of the shape in "
                             "FOLDER/config.json")
    parser.add_argument("-o", "--output", type=Path, help="artifact folder to write (default: ./<model name>.dg)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help=f"target preset from recipes/ or a .json path (default {DEFAULT_RECIPE})")
    parser.add_argument("--format", choices=sorted(FORMATS), help="graph formats (default: the recipe's)")
    quant = parser.add_argument_group("weights (override the recipe's)")
    quant.add_argument("--weight-format", choices=FORMATS_BY_NAME,
                       help="fp32/fp16 for every matrix; int8: int8 matrices (router fp32); int4: int4 attention, "
                            "MLPs and experts, int8 embedding/LM head, fp32 router")
    quant.add_argument("--group-size", type=int, help=f"int4 group size, a power of two >= 16 (default "
                                                      f"{DEFAULT_GROUP}; narrowed per tensor to divide its width)")
    quant.add_argument("--sym", action="store_true", default=None,
                       help="symmetric int4 (no zero points; what NPUs ask for); default asymmetric")
    parser.add_argument("--dry-run", action="store_true", help="print the plan from config.json alone and exit")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    parser.add_argument("--validation", choices=["auto", "full", "by-layer"], default="auto",
                        help="compare with transformers as a whole model, or one layer at a time in bounded memory "
                             "(auto: full where it fits in 4 GB, as --dry-run plans)")
    parser.add_argument("--no-validate", action="store_true", help="skip the comparison with transformers")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="validation's floor for |graph - transformers| / (1 + |transformers|) against float64 "
                             "transformers; a graph may also be within 4x float32 transformers' own error "
                             "(default 1e-4)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_intermixed_args(argv)


class Progress:
    """Numbered stages on stderr, each closed with its duration: `[3/10] tracing denoiser to ONNX ... 41.2 s`."""

    def __init__(self, stages: int):
        self.total, self.done, self.started = stages, 0, time.perf_counter()

    def stage(self, description: str):
        self.description, self.stage_started = description, time.perf_counter()
        print(f"[{self.done + 1}/{self.total}] {description} ...", file=sys.stderr, flush=True)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.done += 1
            print(f"      done in {time.perf_counter() - self.stage_started:.1f} s", file=sys.stderr, flush=True)

    def close(self):
        return time.perf_counter() - self.started


def export(args) -> None:
    synthetic = args.model.startswith(SYNTHETIC_PREFIX)
    if args.model == BUILTIN_ID:
        folder = builtin_checkpoint()
    elif synthetic:
        folder = resolve(args.model.removeprefix(SYNTHETIC_PREFIX), need_weights=False, local_only=True)
    else:
        folder = resolve(args.model, need_weights=not args.dry_run)
    raw_config = read_config(folder)
    recipe = load_recipe(args.recipe)
    formats = FORMATS[args.format] if args.format else recipe["formats"]
    precision = Precision(recipe["weights"], args.weight_format, args.group_size, args.sym, where="--weight-format")
    if args.dry_run:
        from .plan import print_plan
        from .source import load_config

        print_plan(load_config(folder), args.model, formats)
        return
    output = args.output or Path(f"{Path(args.model.replace(':', '-')).name}.dg")
    if output.exists() and not args.overwrite:
        raise UserError(f"output folder {output} exists; pass --overwrite to replace it, or choose another -o")
    if (synthetic or is_artifact(folder)) and args.validation == "full" and not precision.quantized:
        raise UserError(f"{'a synthetic checkpoint' if synthetic else 'an artifact'} has no weights for transformers "
                        "to load, so it cannot be validated in full; use --validation by-layer (the default for it)")
    if not synthetic and not is_artifact(folder):
        check_files(folder)

    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the artifact is meant to be shared like any folder
    (staging / OWNER_FILE).write_text(str(os.getpid()))
    try:
        summary = write_artifact(args, folder, raw_config, recipe, precision, formats, staging)
        (staging / OWNER_FILE).unlink()
        if output.exists():
            old = staging.with_name(staging.name + ".old")
            output.rename(old)
            staging.rename(output)
            shutil.rmtree(old)
        else:
            staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"\nwrote {output}: {summary}")


def synthetic_checkpoint(config, raw_config: dict):
    """Deterministic random weights of the config's shape, in its dtype, with a peaked embedding (logits of std ~5)
    so that token outputs are not decided by float near-ties."""
    from .synthetic import SyntheticCheckpoint

    dtype = {"float32": "fp32", "float16": "fp16"}.get(str(raw_config.get("dtype", "bfloat16")), "bf16")
    return SyntheticCheckpoint(config, dtype, seed=0, embedding_std=5 / config.text_config.hidden_size ** 0.5)


def exporter_running(pid: int) -> bool:
    """Whether process `pid` exists and is a dg-export (a pid can be reused by another program)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.exists() or b"dg" in cmdline.read_bytes()


def remove_stale_staging(output: Path) -> None:
    """Staging folders of exports to `output` whose process is gone (SIGKILL, power loss) are removed, and said."""
    for staging in output.parent.glob(f".{output.name}.partial-*"):
        try:
            owner = int((staging / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not a folder this exporter made, or one being set up right now: leave it
        if exporter_running(owner):
            continue  # another export to the same output is under way
        shutil.rmtree(staging, ignore_errors=True)
        print(f"dg-export: removed {staging.name}, left behind by an export that was killed", file=sys.stderr)


def write_artifact(args, folder: Path, raw_config: dict, recipe: dict, precision: Precision, formats: list[str],
                   staging: Path) -> str:
    import onnx

    from .builder import build_graphs
    from .checkpoint import Checkpoint
    from .graphs import graph_specs, kv_layout
    from .source import load_config
    from .weights import WEIGHTS_FILE, Weights, expected_shapes, progress_bar

    synthetic = args.model.startswith(SYNTHETIC_PREFIX)
    progress = Progress(4 + ("openvino" in formats) + (not args.no_validate))
    with progress.stage(f"reading {args.model}"):
        config = load_config(folder)
        if synthetic:
            checkpoint = synthetic_checkpoint(config, raw_config)
        else:
            checkpoint = ArtifactCheckpoint(folder) if is_artifact(folder) else Checkpoint(folder)
        shapes = expected_shapes(config)
    text = config.text_config
    specs = graph_specs(config)

    params = sum(int(np.prod(checkpoint.shape(n))) for n in checkpoint.names() if n in shapes)
    quantizing = f", quantizing to {precision.label()}" if precision.quantized else ""
    with progress.stage(f"building graphs and streaming weights{quantizing}"):
        bar = progress_bar(params * 4, "weights read")
        weights = Weights(staging / WEIGHTS_FILE, checkpoint, precision, shapes, bar)
        try:
            weights.check_shapes()
            graphs = build_graphs(config, weights)
            # Quantized weights are read by different kernels on OpenVINO: same bytes, its own graphs.
            openvino_sources = build_graphs(config, weights, "openvino") if precision.quantized else graphs
        finally:
            weights.close()
            bar.close()
        for graph, model in graphs.items():
            onnx.save(model, str(staging / f"{graph}.onnx"))
    if "openvino" in formats:
        from . import openvino_graphs

        with progress.stage("converting graphs to OpenVINO IR"):
            for graph, model in openvino_sources.items():
                openvino_graphs.convert(model, staging / f"{graph}.xml", staging / WEIGHTS_FILE)

    with progress.stage("copying config and tokenizer"):
        for name in ("config.json", *TOKENIZER_FILES, *OPTIONAL_FILES):
            if (folder / name).is_file():
                shutil.copy2(folder / name, staging / name)
        if synthetic and not all((staging / name).is_file() for name in TOKENIZER_FILES):
            from .builtin import write_tokenizer

            write_tokenizer(staging)  # random weights: the demo model's byte-level tokenizer is as good as any
        if not (staging / "generation_config.json").is_file():
            from transformers import GenerationConfig

            (staging / "generation_config.json").write_text(GenerationConfig.from_model_config(config).to_json_string())

    generation = json.loads((staging / "generation_config.json").read_text())
    eos = generation.get("eos_token_id", text.eos_token_id)
    manifest = {
        "format_version": FORMAT_VERSION,
        "exporter": {"name": "dg-export", "version": __version__, **library_versions()},
        "source": {"model": args.model, "revision": raw_config.get("_commit_hash") or folder_revision(folder)},
        "modalities": ["text"],
        "model": {
            "architecture": "DiffusionGemmaForBlockDiffusion",
            "canvas_length": config.canvas_length,
            "vocab_size": text.vocab_size,
            "hidden_size": text.hidden_size,
            "layer_types": list(text.layer_types),
            "sliding_window": text.sliding_window,
            "kv_layout": kv_layout(text),
            "max_position_embeddings": text.max_position_embeddings,
            "eos_token_ids": eos if isinstance(eos, list) else [eos],
            "pad_token_id": generation.get("pad_token_id", text.pad_token_id),
        },
        "recipe": recipe["name"],
        "precision": precision.label(),
        "weights": {"roles": precision.summary(), "stored_bytes": weights.stored_bytes(),
                    "tensors": {source: scheme.record() for source, scheme in sorted(weights.schemes.items())}},
        "openvino": recipe["openvino"],
        "graphs": specs,
        "formats": {},
    }
    if "onnx" in formats:
        manifest["formats"]["onnx"] = {"graphs": {g: f"{g}.onnx" for g in GRAPH_NAMES}, "weights": WEIGHTS_FILE}
    if "openvino" in formats:
        manifest["formats"]["openvino"] = {"graphs": {g: f"{g}.xml" for g in GRAPH_NAMES}, "weights": WEIGHTS_FILE}

    if not args.no_validate:
        from .plan import count_parameters, export_estimate

        backends = ["onnxruntime" if f == "onnx" else f for f in formats]
        mode = export_estimate(config, count_parameters(config), args.validation)["validation"]
        if not precision.quantized and (synthetic or is_artifact(folder)):
            mode = "by-layer"  # transformers cannot load those; quantized exports compare with our own fp32 graphs
        if precision.quantized:
            rows = check_quantized(args, config, checkpoint, weights, staging, manifest, backends, mode, progress)
        else:
            rows = validate_against_transformers(args, config, folder, checkpoint, weights, staging, manifest,
                                                 backends, mode, progress)
        manifest["validation"] = {"mode": mode, "atol": args.atol, "results": rows}
        print_validation(rows, "checks of the quantized artifact" if precision.quantized else
                         "validation against float64 transformers (floats: max |graph - transformers| / "
                         "(1 + |transformers|), allowed: max(atol, 4x float32 transformers' own); tokens: fraction "
                         "that are not transformers' choice or a float tie with it)")
        failed = [r for r in rows if not r["ok"]]
        if failed:
            worst = max(failed, key=lambda r: r["diff"] / max(r["bound"], 1e-30))
            raise UserError(f"validation failed: {len(failed)} output(s) over tolerance, worst {worst['backend']} "
                            f"{worst['graph']} {worst['output']} = {worst['diff']:.3g} (allowed {worst['bound']:.3g}); "
                            "nothing was written")
        if "quality" in manifest:
            from dg_quantize.quality import format_report, write_report

            write_report(staging, manifest["quality"])
            print(format_report(manifest["quality"]), file=sys.stderr)
    if "onnx" not in formats:
        for graph in GRAPH_NAMES:
            (staging / f"{graph}.onnx").unlink()

    with progress.stage("writing manifest and checksums"):
        write_manifest(staging, manifest)
    seconds = progress.close()
    size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    return (f"{', '.join(formats)} graphs, {params / 1e6:.2f} M text parameters, {size / 1e6:.1f} MB on disk, "
            f"{seconds:.0f} s")


def validate_against_transformers(args, config, folder, checkpoint, weights, staging, manifest, backends, mode,
                                  progress) -> list[dict]:
    from . import validate
    from .weights import progress_bar

    with progress.stage(f"validating against transformers ({mode})"):
        if mode == "full":
            from .source import load_model

            return validate.validate(load_model(folder), staging, manifest, backends, args.atol)
        bar = progress_bar(validate.component_count(config), "components", unit="it")
        try:
            return validate.validate_by_layer(config, checkpoint, staging, weights, backends, args.atol, progress=bar)
        finally:
            bar.close()


def check_quantized(args, config, checkpoint, weights, staging, manifest, backends, mode, progress) -> list[dict]:
    """Quantized weights are checked against the checkpoint (within half a step); what they cost is measured
    against fp32 graphs of the same checkpoint (the quality report) where those fit in memory."""
    from . import validate

    stage = "checking the quantized weights" + (" and measuring them against fp32 graphs" if mode == "full" else "")
    with progress.stage(stage):
        rows = validate.mark_ok([validate.weights_row(checkpoint, weights, staging)])
        if mode == "full" and rows[0]["ok"]:
            manifest["quality"] = measure_quality(config, checkpoint, staging, manifest, backends,
                                                  demo=args.model == BUILTIN_ID)
    if mode != "full":
        print("dg-export: no quality report: it runs fp32 graphs of the whole model, which would not fit in memory "
              "(see --dry-run); the quantized weights were checked", file=sys.stderr)
    return rows


def measure_quality(config, checkpoint, staging: Path, manifest: dict, backends: list[str], demo: bool) -> dict:
    """Export fp32 ONNX graphs of the same checkpoint beside the artifact (hidden, removed after) and measure the
    quantized graphs against them on every backend; on the demo model also its exact-match accuracy."""
    import onnx
    from dg_quantize import quality

    from .builder import build_graphs
    from .weights import WEIGHTS_FILE, Weights

    reference = staging / ".fp32-reference"
    reference.mkdir()
    try:
        weights = Weights(reference / WEIGHTS_FILE, checkpoint)
        try:
            graphs = build_graphs(config, weights)
        finally:
            weights.close()
        for graph, model in graphs.items():
            onnx.save(model, str(reference / f"{graph}.onnx"))
        for file in staging.iterdir():
            if file.is_file() and file.suffix not in (".onnx", ".xml", ".bin") and not file.name.startswith("."):
                shutil.copy2(file, reference / file.name)
        write_manifest(reference, {**manifest, "precision": "fp32", "weights": {},
                                   "formats": {"onnx": {"graphs": {g: f"{g}.onnx" for g in GRAPH_NAMES},
                                                        "weights": WEIGHTS_FILE}}})
        write_manifest(staging, manifest)  # the runtime opens artifacts by their manifest
        rows = [quality.measure(staging, reference, backend) for backend in backends]
        if demo:
            fp32_accuracy = quality.demo_accuracy(reference, "onnxruntime")
            for row in rows:
                row.update(demo_exact_match=quality.demo_accuracy(staging, row["backend"]),
                           fp32_demo_exact_match=fp32_accuracy)
    finally:
        shutil.rmtree(reference, ignore_errors=True)
    return {"precision": manifest["precision"], "reference": "fp32 ONNX graphs of the same checkpoint, ONNX Runtime",
            "backends": rows}


def print_validation(rows: list[dict], title: str) -> None:
    """One line per backend, graph and output; by-layer rows are summarised over layers (the worst one shown)."""
    print(f"\n{title}:", file=sys.stderr)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backend"], re.sub(r"\.\d+$", "", r["graph"]), r["output"]), []).append(r)
    for (backend, graph, output), members in groups.items():
        worst = max(members, key=lambda r: r["diff"] / max(r["bound"], 1e-30))
        label = f"{graph} ({len(members)})" if len(members) > 1 else graph
        print(f"  {backend:11} {label:20} {output:29} {worst['diff']:.2e} (allowed {worst['bound']:.1e})  "
              f"{'ok' if all(r['ok'] for r in members) else 'FAIL'}", file=sys.stderr)


def library_versions() -> dict:
    from importlib.metadata import version

    return {lib: version(lib) for lib in ("torch", "transformers", "onnx", "onnxruntime", "openvino")}


def folder_revision(folder: Path) -> str | None:
    """The hub commit of a snapshot folder (…/snapshots/<commit>/), if it is one."""
    return folder.name if folder.parent.name == "snapshots" else None


def main(argv=None, prog: str = "dg-export") -> int:
    """`prog` names the command in errors (dg-quantize runs this too)."""
    args = parse_args(argv, prog)
    return run_cli(prog, lambda: export(args))


if __name__ == "__main__":
    sys.exit(main())
