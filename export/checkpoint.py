"""A checkpoint's tensors, read one at a time from its safetensors shards.

The exporter never holds the model: it asks for one tensor, converts it, writes it and lets it go. The shards
are read with plain positioned reads (the safetensors format is an 8-byte header length, a JSON header and raw
little-endian data), not mapped, so the process holds one tensor at a time whatever the checkpoint's size.
Nothing here unpickles anything.
"""

import json
import struct
from pathlib import Path

import numpy as np

from dg_quantize.schemes import FLOAT_FORMATS
from dg_runtime.artifact import MANIFEST_NAME, load_manifest
from dg_runtime.errors import UserError

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
          "I32": np.int32}
MAX_HEADER_BYTES = 100 << 20
INDEX_FILE = "model.safetensors.index.json"
CHUNK_BYTES = 64 << 20  # tensors stream through memory in pieces of about this many fp32 bytes


def row_chunks(shape, whole: bool = False):
    """(start, stop) ranges of a tensor's first axis holding about CHUNK_BYTES of fp32 each; one (0, None) for a
    scalar, or when the tensor must be handled whole."""
    if whole or not shape:
        yield 0, None
        return
    rows = max(1, CHUNK_BYTES // (4 * int(np.prod(shape[1:]))))
    for start in range(0, shape[0], rows):
        yield start, min(shape[0], start + rows)


def bf16_to_fp32(bits: np.ndarray) -> np.ndarray:
    wide = bits.astype(np.uint32)
    wide <<= 16  # in place: the widened copy is the only one
    return wide.view(np.float32)


class Checkpoint:
    """The tensors of a local checkpoint folder: a single `model.safetensors`, or shards and their index."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.entries: dict[str, tuple[Path, dict]] = {}  # name -> (shard, header entry with absolute offsets)
        index = self.folder / INDEX_FILE
        weight_map = read_index(index) if index.is_file() else {}
        shards = sorted({self.folder / shard for shard in weight_map.values()}) or sorted(self.folder.glob("*.safetensors"))
        for shard in shards:
            if not shard.is_file():
                raise UserError(f"shard {shard.name} named by {index.name} is missing from {self.folder}; "
                                "download the checkpoint again")
            for name, entry in read_header(shard).items():
                self.entries[name] = (shard, entry)
        missing = sorted(set(weight_map) - set(self.entries))
        if missing:
            raise UserError(f"{index.name} names {len(missing)} tensor(s) that no shard holds, first "
                            f"{missing[0]!r}: the checkpoint is incomplete; download it again")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """One tensor, or rows [start, stop) of its first axis, as float32 (bf16 and fp16 are widened exactly)."""
        if name not in self.entries:
            raise UserError(f"the checkpoint has no tensor {name!r}: it does not match its config.json")
        shard, entry = self.entries[name]
        shape = entry["shape"]
        itemsize = np.dtype(DTYPES[entry["dtype"]]).itemsize
        row_bytes = itemsize * int(np.prod(shape[1:])) if shape else itemsize
        stop = (shape[0] if shape else 1) if stop is None else stop
        raw = np.empty((stop - start) * row_bytes, dtype=np.uint8)
        with open(shard, "rb") as handle:
            handle.seek(entry["data_offsets"][0] + start * row_bytes)
            if handle.readinto(memoryview(raw)) != raw.size:
                raise UserError(f"{shard.name} is truncated (tensor {name}); download the checkpoint again")
        array = raw.view(DTYPES[entry["dtype"]]).reshape([stop - start, *shape[1:]] if shape else [])
        del raw
        if entry["dtype"] == "BF16":
            return bf16_to_fp32(array)
        return array.astype(np.float32, copy=False)


def read_index(index: Path) -> dict:
    """The index's map of tensor name to shard file."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
        return weight_map
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{index} is not a safetensors index ({type(exc).__name__}); download it again") from None


def read_header(shard: Path) -> dict:
    """The shard's tensor table, with data offsets made absolute; a corrupt header is the user's to fix."""
    problem = f"{shard.name} is not a valid safetensors file"
    size = shard.stat().st_size
    with open(shard, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise UserError(f"{problem} (it is {size} bytes); download it again")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise UserError(f"{problem} (header length {length} does not fit the file); download it again")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{problem} (its JSON header is corrupt); download it again") from None
    if not isinstance(header, dict):
        raise UserError(f"{problem} (its header is not a table of tensors); download it again")
    header.pop("__metadata__", None)
    base = 8 + length
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
            itemsize = np.dtype(DTYPES[dtype]).itemsize
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{problem} (tensor {name!r} has a malformed or unsupported entry); "
                            "dg-export reads F32, F16 and BF16 weights") from None
        if end - start != itemsize * int(np.prod(shape)) or base + end > size:
            raise UserError(f"{problem} (tensor {name!r} lies outside the file or has the wrong size); "
                            "download it again")
        entry["data_offsets"] = (base + start, base + end)
    return header


# --- an fp32 or fp16 artifact read back as a checkpoint, so that it can be quantized without the original weights.
# The artifact's ONNX graphs say where each checkpoint tensor lies in model.bin and in which layout (`NAME` as
# the checkpoint stores it, `NAME.linear` with its last two axes swapped); reads return the checkpoint's layout in
# float32, a range of rows at a time, as Checkpoint does.

def is_artifact(folder: Path) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


class ArtifactCheckpoint:
    def __init__(self, folder: Path):
        import onnx

        from .weights import NUMPY_TYPES, external_location

        self.folder = Path(folder)
        manifest = load_manifest(self.folder)
        stored = {entry["format"] for entry in manifest.get("weights", {}).get("tensors", {}).values()}
        if not stored <= set(FLOAT_FORMATS):
            raise UserError(f"{folder} is already quantized ({manifest.get('precision')}); quantize from its "
                            "checkpoint or from an fp32/fp16 artifact")
        if "onnx" not in manifest["formats"]:
            raise UserError(f"{folder} has no ONNX graphs, which say where its weights lie; export it with "
                            "--format both (or onnx) to quantize it")
        self.tensors: dict[str, tuple[int, np.dtype, tuple, bool]] = {}  # name -> offset, dtype, stored dims, linear
        for graph in manifest["formats"]["onnx"]["graphs"].values():
            model = onnx.load(str(self.folder / graph), load_external_data=False)
            for tensor in model.graph.initializer:
                if tensor.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                linear = tensor.name.endswith(".linear")
                name = tensor.name.removesuffix(".linear")
                self.tensors[name] = (external_location(tensor)[1], np.dtype(NUMPY_TYPES[tensor.data_type]),
                                      tuple(tensor.dims), linear)
        self.weights = self.folder / manifest["formats"]["onnx"]["weights"]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        _, _, dims, linear = self.tensors[name]
        return (*dims[:-2], dims[-1], dims[-2]) if linear else dims

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        offset, dtype, dims, linear = self.tensors[name]
        if not dims:
            return np.fromfile(self.weights, dtype=dtype, count=1, offset=offset).astype(np.float32).reshape(())
        if linear and len(dims) == 2:  # rows of the checkpoint's layout are columns here: read it whole
            whole = np.fromfile(self.weights, dtype=dtype, count=dims[0] * dims[1], offset=offset).reshape(dims)
            return np.ascontiguousarray(whole.T[start:stop], dtype=np.float32)
        stop = dims[0] if stop is None else stop
        row = int(np.prod(dims[1:]))
        rows = np.fromfile(self.weights, dtype=dtype, count=(stop - start) * row, offset=offset + start * row * dtype.itemsize)
        rows = rows.reshape(stop - start, *dims[1:]).astype(np.float32)
        return np.ascontiguousarray(np.swapaxes(rows, -1, -2)) if linear else rows
