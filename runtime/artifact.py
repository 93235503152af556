"""The artifact folder: its manifest, its files and their checksums.

The exporter writes the manifest with `write_manifest`; the runtime reads it back with `load_manifest`. Both
sides use the constants here, so the format is defined once.
"""

import hashlib
import json
from pathlib import Path

from .errors import ArtifactError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 3  # 2: one graph for the encoder and the denoiser; 3: the int8 embedding stored int8


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: dict) -> None:
    """Record the size and sha256 of every file in the folder, then write the manifest beside them."""
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith("."))  # hidden: the exporter's
    manifest["files"] = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def load_manifest(folder: Path, verify_checksums: bool = True) -> dict:
    """Read and check an artifact folder's manifest; raise ArtifactError naming the first problem found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist; export one with `dg-export MODEL -o {folder}`",
                            folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST_NAME}: it is not a dg-export artifact (re-export it)", folder)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-export the artifact", path) from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {version!r}; this runtime reads version {FORMAT_VERSION}: "
                            "re-export the artifact with a matching dg-export, or upgrade dg-edge", path)
    problem = schema_problem(manifest, SCHEMA)
    if problem:
        raise ArtifactError(f"{path} is not a valid manifest ({problem}); re-export the artifact", path)
    for name, entry in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise ArtifactError(f"artifact file {file} is missing; re-export the artifact", file)
        if file.stat().st_size != entry["bytes"]:
            raise ArtifactError(f"artifact file {file} has {file.stat().st_size} bytes, the manifest says "
                                f"{entry['bytes']}: the file is truncated or corrupted; re-export the artifact", file)
        if verify_checksums and sha256_file(file) != entry["sha256"]:
            raise ArtifactError(f"artifact file {file} does not match its sha256 in the manifest: it is corrupted; "
                                "re-export the artifact", file)
    return manifest


def is_quantized(manifest: dict) -> bool:
    """Whether any stored tensor is int8 or int4."""
    return any(t["format"] in ("int8", "int4") for t in manifest.get("weights", {}).get("tensors", {}).values())


# What the runtime reads from a manifest, by type. A dict maps required keys to their schemas; {str: X} is a
# mapping of any keys to X; [X] a list of X; a tuple of types the allowed types.
INT, TEXT = (int,), (str,)
TENSOR = {"name": TEXT, "dtype": TEXT, "shape": [(int, str)]}
GRAPH = {"inputs": [TENSOR], "outputs": [TENSOR]}
SCHEMA = {
    "format_version": INT,
    "model": {"canvas_length": INT, "vocab_size": INT, "hidden_size": INT, "layer_types": [TEXT],
              "sliding_window": INT, "kv_layout": [{"type": TEXT, "kv_heads": INT, "head_dim": INT}],
              "max_position_embeddings": INT, "eos_token_ids": [INT], "pad_token_id": INT},
    "openvino": {"inference_precision": TEXT},
    "graphs": {"model": GRAPH},
    "formats": {str: {"graphs": {"model": TEXT}, "weights": TEXT}},
    "files": {str: {"bytes": INT, "sha256": TEXT}},
}


def schema_problem(value, schema, where: str = "manifest") -> str | None:
    """The first place where `value` does not fit `schema`, or None."""
    if isinstance(schema, tuple):
        ok = isinstance(value, schema) and not (isinstance(value, bool) and bool not in schema)
        return None if ok else f"{where} should be {' or '.join(t.__name__ for t in schema)}, not {type(value).__name__}"
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{where} should be a list, not {type(value).__name__}"
        return next(filter(None, (schema_problem(v, schema[0], f"{where}[{i}]") for i, v in enumerate(value))), None)
    if not isinstance(value, dict):
        return f"{where} should be an object, not {type(value).__name__}"
    if str in schema:
        return next(filter(None, (schema_problem(v, schema[str], f"{where}.{k}") for k, v in value.items())), None)
    for key, sub in schema.items():
        if key not in value:
            return f"{where}.{key} is missing"
        problem = schema_problem(value[key], sub, f"{where}.{key}")
        if problem:
            return problem
    return None
