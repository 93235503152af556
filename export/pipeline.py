"""`export()`: a checkpoint (or an fp32/fp16 artifact) in, a validated, self-describing artifact folder out.

    read the source -> build the graph, streaming each weight into model.bin at its recipe's precision
    -> OpenVINO IR over the same bytes -> tokenizer and configs -> validate (transformers in float64, or the
    quantized weights and their quality against fp32 graphs) -> manifest with checksums -> rename into place

dg-export and dg-quantize are this function's command lines; the benchmarks and the tests call it directly.
"""

import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dg_quantize.roles import Precision, role_of
from dg_runtime.artifact import FORMAT_VERSION, write_manifest
from dg_runtime.errors import UserError

from . import __version__
from .builtin import BUILTIN_ID, BUILTINS, builtin_checkpoint
from .recipes import DEFAULT_RECIPE, load_recipe
from .source import OPTIONAL_FILES, TOKENIZER_FILES, check_files, read_config, resolve

SYNTHETIC_PREFIX = "synthetic:"  # synthetic:CONFIG_FOLDER streams deterministic random weights of that shape
OWNER_FILE = ".dg-export.pid"  # in a staging folder while its export runs
VALIDATIONS = ("auto", "full", "by-layer")


def export(model: str | Path = BUILTIN_ID, output: str | Path | None = None, *, recipe: str = DEFAULT_RECIPE,
           formats: Sequence[str] | None = None, weight_format: str | None = None, group_size: int | None = None,
           sym: bool | None = None, ratio: float | None = None, vision_weight_format: str | None = None,
           overwrite: bool = False, validation: str | None = "auto", atol: float = 1e-4, text_only: bool = False) -> Path:
    """Export `model` (a checkpoint folder, a hub id, `builtin:tiny`, `synthetic:FOLDER`, or an fp32/fp16 artifact
    to quantize) to the artifact folder `output` (default ./<model name>.dg) and return its path.

    recipe: a preset from recipes/ or a .json path; formats ("onnx", "openvino"), weight_format (fp32, fp16, int8,
    int4), group_size (-1: per channel, OpenVINO only), sym, ratio (the share of int4 weights kept int4, the rest
    int8) and vision_weight_format (the vision tower's: fp32, fp16 or int8) override it. validation: "auto" (full where transformers' model fits in 4 GB, else
    by layer), "full", "by-layer", or None for none. atol: validation's floor (see dg_export.validate).
    text_only: leave the vision tower out (it is exported when the checkpoint has one, see `takes_images`).
    The folder appears whole or not at all: the export writes a hidden staging folder beside it and renames it.
    Progress goes to stderr; UserError says what is wrong with the input."""
    model = str(model)
    if validation not in (*VALIDATIONS, None):
        raise UserError(f"{{validation}} must be one of {', '.join(VALIDATIONS)} or none (got {validation!r})",
                        "validation")
    source = Source(model)
    chosen = load_recipe(recipe)
    formats = list(formats or chosen["formats"])
    if not formats or not set(formats) <= {"onnx", "openvino"}:
        raise UserError(f"{{formats}} must be onnx, openvino or both (got {formats})", "formats")
    precision = Precision(chosen["weights"], weight_format, group_size, sym, ratio, vision_weight_format,
                          where="the weight format")
    if precision.group == -1 and "int4" in precision.formats.values() and "onnx" in formats:
        raise UserError("per-channel int4 ({group_size} -1) is OpenVINO's: ONNX Runtime's MatMulNBits takes "
                        "power-of-two groups; choose {formats} openvino, or a group size", "group_size", "formats")
    if "static" in chosen["openvino"] and "onnx" in formats:
        raise UserError(f"recipe {chosen['name']} fixes OpenVINO's shapes (openvino.static); its graphs are OpenVINO's "
                        "only: choose {formats} openvino", "formats")
    output = Path(output) if output is not None else Path(f"{Path(model.replace(':', '-')).name}.dg")
    if output.exists() and not overwrite:
        raise UserError(f"output folder {output} exists; use {{overwrite}} to replace it, or choose another "
                        "{output}", "overwrite", "output")
    if output.exists() and not output.is_dir():
        raise UserError(f"{output} is a file; choose a folder for {{output}}", "output")
    if source.weightless and validation == "full" and not precision.quantized:
        raise UserError(f"{source.kind} has no weights for transformers to load, so it cannot be validated in full; "
                        "use {validation} by-layer (the default for it)", "validation")
    if not source.synthetic and not source.artifact:
        check_files(source.folder)
    existing_parent(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(output)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the artifact is meant to be shared like any folder
    (staging / OWNER_FILE).write_text(str(os.getpid()))
    try:
        summary = write_artifact(source, chosen, precision, formats, staging, validation, atol, text_only)
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
    print(f"\nwrote {output}: {summary}", file=sys.stderr)
    return output


def plan(model: str | Path, formats: Sequence[str] = ("onnx", "openvino")) -> None:
    """Print what exporting `model` takes, from its config.json alone (no weights read or downloaded)."""
    from .plan import print_plan
    from .source import load_config

    source = Source(str(model), need_weights=False)
    print_plan(load_config(source.folder), str(model), list(formats), "vision_config" in source.raw_config)


def existing_parent(path: Path) -> None:
    """Refuse an output path that runs through a file (the folder could not be made)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{parent} is a file, so {path} cannot be made; choose another {{output}}", "output")
            return


class Source:
    """What the export reads from: the checkpoint's folder, and what kind of source it is."""

    def __init__(self, model: str, need_weights: bool = True):
        from .checkpoint import is_artifact

        self.model, self.synthetic = model, model.startswith(SYNTHETIC_PREFIX)
        if model.startswith("builtin:"):
            if model not in BUILTINS:
                raise UserError(f"no embedded model {model}; the embedded ones are {', '.join(BUILTINS)}")
            self.folder = builtin_checkpoint(model)
        elif self.synthetic:
            self.folder = resolve(model.removeprefix(SYNTHETIC_PREFIX), need_weights=False, local_only=True)
        else:
            self.folder = resolve(model, need_weights=need_weights)
        self.artifact = is_artifact(self.folder)
        self.weightless = self.synthetic or self.artifact  # nothing transformers can load
        self.kind = "a synthetic checkpoint" if self.synthetic else "an artifact" if self.artifact else "a checkpoint"
        self.raw_config = read_config(self.folder)

    def checkpoint(self, config):
        from .checkpoint import ArtifactCheckpoint, Checkpoint

        if self.synthetic:
            return synthetic_checkpoint(config, self.raw_config)
        return ArtifactCheckpoint(self.folder) if self.artifact else Checkpoint(self.folder)


class Progress:
    """Numbered stages on stderr, each closed with its duration: `[3/6] validating ... done in 41.2 s`."""

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
        if exporter_running(owner) and owner != os.getpid():
            continue  # another export to the same output is under way
        shutil.rmtree(staging, ignore_errors=True)
        print(f"dg-export: removed {staging.name}, left behind by an export that was killed", file=sys.stderr)


def takes_images(config, checkpoint, static: bool) -> bool:
    """Whether the artifact gets the vision path: the config has a vision tower whose tensors the checkpoint holds,
    its image tokens are in the vocabulary, and the shapes are not static (the NPU form is text-only for now)."""
    from .weights import expected_shapes

    if config.vision_config is None or static:
        return False
    tower = [name for name in expected_shapes(config, images=True) if "vision" in name]
    ids = (config.image_token_id, config.boi_token_id, config.eoi_token_id)
    return all(name in checkpoint for name in tower) and max(ids) < config.text_config.vocab_size


def vision_entry(config, folder: Path) -> dict:
    """What the runtime needs to turn an image into the vision graph's inputs and place its tokens."""
    processor = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            found = json.loads((folder / name).read_text())
            processor = found.get("image_processor", found)
            break
    vision = config.vision_config
    return {"patch_size": vision.patch_size, "pooling_kernel": vision.pooling_kernel_size,
            "max_soft_tokens": processor.get("max_soft_tokens", 280),
            "position_embedding_size": vision.position_embedding_size, "image_token_id": config.image_token_id,
            "boi_token_id": config.boi_token_id, "eoi_token_id": config.eoi_token_id,
            "bidirectional": getattr(config.text_config, "use_bidirectional_attention", None) == "vision"}


def write_artifact(source: Source, recipe: dict, precision: Precision, formats: list[str], staging: Path,
                   validation: str | None, atol: float, text_only: bool = False) -> str:
    import onnx

    from .builder import build_graphs
    from .graphs import graph_specs, kv_layout, static_graph_specs, static_shapes
    from .source import load_config
    from .weights import WEIGHTS_FILE, Weights, expected_shapes, progress_bar

    progress = Progress(4 + ("openvino" in formats) + (validation is not None) + (precision.ratio < 1))
    with progress.stage(f"reading {source.model}"):
        config = load_config(source.folder)
        checkpoint = source.checkpoint(config)
        images = not text_only and takes_images(config, checkpoint, "static" in recipe["openvino"])
        shapes = expected_shapes(config, images)
    if not images and precision.vision != "fp32":
        print(f"dg-export: no vision tower in this export; the tower's {precision.vision} format does not apply",
              file=sys.stderr)
        precision.vision = "fp32"
    text = config.text_config

    params = sum(int(np.prod(checkpoint.shape(n))) for n in checkpoint.names() if n in shapes)
    weights = Weights(staging / WEIGHTS_FILE, checkpoint, precision, shapes)
    moe = recipe["openvino"].get("moe", "sorted")
    static = static_shapes(config, recipe["openvino"]["static"]) if "static" in recipe["openvino"] else None
    try:
        weights.check_shapes()
        if precision.ratio < 1:
            with progress.stage(f"ranking the int4 tensors by their int4 error for --ratio {precision.ratio:g}"):
                choose_backup_tensors(weights, precision)
        quantizing = f", quantizing to {precision.label()}" if precision.quantized else ""
        with progress.stage(f"building graphs and streaming weights{quantizing}"):
            weights.progress = progress_bar(params * 4, "weights read")
            graphs = build_graphs(config, weights, images=images) if "onnx" in formats else {}
            # Quantized weights are read by different kernels on OpenVINO (same bytes), and a tiled MoE block is
            # OpenVINO's alone: its own graphs then.
            if "openvino" in formats:
                own = precision.quantized or moe == "tiled" or not graphs
                openvino_sources = build_graphs(config, weights, "openvino", moe, static, images) if own else graphs
            weights.progress.close()
            for graph, model in graphs.items():
                onnx.save(model, str(staging / f"{graph}.onnx"))
    finally:
        weights.close()
    say_backup_precision(precision, weights.schemes)
    if "openvino" in formats:
        from . import openvino_graphs

        with progress.stage("converting graphs to OpenVINO IR"):
            for graph, model in openvino_sources.items():
                kv_state = recipe["openvino"].get("kv_state") and graph == "model"
                openvino_graphs.convert(model, staging / f"{graph}.xml", staging / WEIGHTS_FILE,
                                        (kv_layout(text), text.sliding_window) if kv_state else None)

    with progress.stage("copying config and tokenizer"):
        for name in ("config.json", *TOKENIZER_FILES, *OPTIONAL_FILES):
            if (source.folder / name).is_file():
                shutil.copy2(source.folder / name, staging / name)
        if source.synthetic and not all((staging / name).is_file() for name in TOKENIZER_FILES):
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
        "source": {"model": source.model,
                   "revision": source.raw_config.get("_commit_hash") or folder_revision(source.folder)},
        "modalities": ["text", "image"] if images else ["text"],
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
                    "tensors": {name: scheme.record() for name, scheme in sorted(weights.schemes.items())}},
        "openvino": {**recipe["openvino"], **({"static": static} if static else {})},
        "graphs": static_graph_specs(config, static) if static else graph_specs(config, images=images),
        "formats": {},
        **({"vision": vision_entry(config, source.folder)} if images else {}),
    }
    for fmt, suffix in (("onnx", "onnx"), ("openvino", "xml")):
        if fmt in formats:
            manifest["formats"][fmt] = {"graphs": {g: f"{g}.{suffix}" for g in manifest["graphs"]}, "weights": WEIGHTS_FILE}

    if validation is not None:
        from .plan import count_parameters, export_estimate

        backends = ["onnxruntime" if f == "onnx" else f for f in formats]
        mode = export_estimate(config, count_parameters(config), validation)["validation"]
        if not precision.quantized and source.weightless:
            mode = "by-layer"  # transformers cannot load those; quantized exports compare with our own fp32 graphs
        if precision.quantized:
            rows = check_quantized(source, config, checkpoint, weights, staging, manifest, backends, mode, progress)
        else:
            rows = validate_against_transformers(source, config, checkpoint, weights, staging, manifest, backends,
                                                 mode, atol, progress)
        manifest["validation"] = {"mode": mode, "atol": atol, "results": rows}
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
    with progress.stage("writing manifest and checksums"):
        write_manifest(staging, manifest)
    seconds = progress.close()
    size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
    tower = sum(int(np.prod(shape)) for name, shape in shapes.items() if role_of(name) == "vision")
    return (f"{', '.join(formats)} graphs, {(params - tower) / 1e6:.2f} M text parameters"
            f"{f' + {tower / 1e6:.2f} M in the vision tower' if tower else ''}, {size / 1e6:.1f} MB on disk, "
            f"{seconds:.0f} s")


def choose_backup_tensors(weights, precision: Precision) -> None:
    """--ratio: the int4 tensors int4 would change most go to int8 (dg_quantize.sensitivity), said on stderr."""
    from dg_quantize.sensitivity import backup_tensors

    from .checkpoint import row_chunks

    tensors = {}
    for name, shape in weights.expected_shapes.items():
        scheme = precision.scheme(name, tuple(shape))
        if scheme.format == "int4":
            tensors[name] = (tuple(shape), scheme)

    def read(name):
        stored = weights.resolve(name)
        return (weights.checkpoint.read(stored, start, stop) for start, stop in row_chunks(tensors[name][0]))

    precision.backup, share = backup_tensors(tensors, read, precision.ratio)
    print(f"dg-export: --ratio {precision.ratio:g}: {len(precision.backup)} of {len(tensors)} int4 tensors kept at "
          f"int8, the ones int4 changes most; int4 holds {share:.1%} of their parameters", file=sys.stderr)


def say_backup_precision(precision: Precision, schemes: dict) -> None:
    """Tensors whose width no int4 group divides were kept at int8 (as NNCF keeps them at its backup precision)."""
    kept = [name for name, scheme in schemes.items() if scheme.format == "int8"
            and precision.format_of(role_of(name)) == "int4" and name not in precision.backup]
    if kept:
        print(f"dg-export: {len(kept)} tensor(s) kept at int8, the backup precision: no int4 group of at least 16 "
              f"divides their input width (first: {kept[0]}); the manifest records each tensor's format",
              file=sys.stderr)


def validate_against_transformers(source: Source, config, checkpoint, weights, staging: Path, manifest: dict,
                                  backends: list[str], mode: str, atol: float, progress: Progress) -> list[dict]:
    from . import validate
    from .weights import progress_bar

    with progress.stage(f"validating against transformers ({mode})"):
        if mode == "full":
            from .source import load_model

            return validate.validate(load_model(source.folder), staging, manifest, backends, atol)
        images = "vision" in manifest
        bar = progress_bar(validate.component_count(config, images), "components", unit="it")
        try:
            # the components as the artifact's graphs are built: ONNX's where it has them, else OpenVINO's
            target = "onnx" if "onnx" in manifest["formats"] else "openvino"
            moe = "sorted" if target == "onnx" else manifest["openvino"].get("moe", "sorted")
            return validate.validate_by_layer(config, checkpoint, staging, weights, backends, atol, progress=bar,
                                              target=target, moe=moe, images=images)
        finally:
            bar.close()


def check_quantized(source: Source, config, checkpoint, weights, staging: Path, manifest: dict, backends: list[str],
                    mode: str, progress: Progress) -> list[dict]:
    """Quantized weights are checked against the checkpoint (within half a step); what they cost is measured
    against fp32 graphs of the same checkpoint (the quality report) where those fit in memory."""
    from . import validate

    stage = "checking the quantized weights" + (" and measuring them against fp32 graphs" if mode == "full" else "")
    with progress.stage(stage):
        rows = validate.mark_ok([validate.weights_row(checkpoint, weights, staging)])
        if mode == "full" and rows[0]["ok"]:
            manifest["quality"] = measure_quality(config, checkpoint, staging, manifest, backends,
                                                  demo=source.model.removeprefix("builtin:") if source.model
                                                  in BUILTINS else None)
    if mode != "full":
        print("dg-export: no quality report: it runs fp32 graphs of the whole model, which full validation does "
              "(too large for memory here, or not asked for; see --dry-run); the quantized weights were checked",
              file=sys.stderr)
    return rows


def measure_quality(config, checkpoint, staging: Path, manifest: dict, backends: list[str], demo: str | None) -> dict:
    """Export fp32 ONNX graphs of the same checkpoint beside the artifact (hidden, removed after) and measure the
    quantized graphs against them on every backend, on held-out problems of the embedded model `demo` (of `tiny`,
    as text like any other, for other models); on an embedded model also its exact-match accuracy."""
    import onnx
    from dg_quantize import quality

    from .builder import build_graphs
    from .demo import problems
    from .graphs import graph_specs
    from .weights import WEIGHTS_FILE, Weights

    images = "vision" in manifest
    reference = staging / ".fp32-reference"
    reference.mkdir()
    try:
        weights = Weights(reference / WEIGHTS_FILE, checkpoint)
        try:
            graphs = build_graphs(config, weights, images=images)
        finally:
            weights.close()
        for graph, model in graphs.items():
            onnx.save(model, str(reference / f"{graph}.onnx"))
        for file in staging.iterdir():
            if file.is_file() and file.suffix not in (".onnx", ".xml", ".bin") and not file.name.startswith("."):
                shutil.copy2(file, reference / file.name)
        write_manifest(reference, {**manifest, "precision": "fp32", "weights": {},
                                   "graphs": graph_specs(config, images=images),
                                   "openvino": {k: v for k, v in manifest["openvino"].items() if k != "static"},
                                   "formats": {"onnx": {"graphs": {g: f"{g}.onnx" for g in graphs},
                                                        "weights": WEIGHTS_FILE}}})
        write_manifest(staging, manifest)  # the runtime opens artifacts by their manifest
        # held-out demo problems: in the demo model's domain, as good as any text for random weights
        prompts = [prompt for prompt, _, _ in problems(demo or "tiny", quality.PROMPT_SEED, quality.PROMPT_COUNT)]
        rows = [quality.measure(staging, reference, backend, prompts) for backend in backends]
        image_rows = [quality.measure(staging, reference, backend, prompts, with_images=True)
                      for backend in backends] if images else []
        if demo:
            checkable = [(prompt, answer) for prompt, answer, _ in problems(demo, quality.PROMPT_SEED,
                                                                            quality.EXACT_MATCH_COUNT[demo])
                         if answer is not None]
            fp32_accuracy = quality.exact_match(reference, "onnxruntime", checkable)
            for row in rows:
                row.update(demo_exact_match=quality.exact_match(staging, row["backend"], checkable),
                           fp32_demo_exact_match=fp32_accuracy)
    finally:
        shutil.rmtree(reference, ignore_errors=True)
    return {"precision": manifest["precision"], "reference": "fp32 ONNX graphs of the same checkpoint, ONNX Runtime",
            "backends": rows, **({"images": image_rows} if images else {})}


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
