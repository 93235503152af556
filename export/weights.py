"""The artifact's one weights file: checkpoint tensors streamed in as the graphs ask for them.

Each tensor is read from the checkpoint, laid out for the graph (linear weights as [in, out]), converted to the
recipe's stored precision for its role (quantized by dg_quantize, a chunk of rows at a time), appended at a 64-byte-aligned offset and released. Both graphs and both formats point
at the same bytes: a tensor the encoder and the denoiser share is written once.
"""

import sys
from pathlib import Path
import numpy as np
from onnx import TensorProto

from dg_quantize.schemes import Scheme, dequantize_int4, dequantize_int8, int4_groups, int8_channels

from .checkpoint import row_chunks

ALIGNMENT = 64  # bytes; lets a runtime map tensors straight from the file
WEIGHTS_FILE = "model.bin"  # beside model.xml under its name, so OpenVINO's own tools read the IR unchanged
STORED = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}
ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8}
NUMPY_TYPES = {onnx_type: np_type for np_type, onnx_type in ONNX_TYPES.items()}
# Layouts of one half of a stacked [..., 2 x out, in] tensor (the experts' gate_up_proj), stored on their own.
HALVES = {"gate": 0, "up": 1}
# Tensors transformers ties to others; a checkpoint stores one name of each pair.
ALIASES = (("model.encoder.language_model.", "model.decoder."),)


class Weights:
    def __init__(self, path: Path, checkpoint, precision=None, expected_shapes: dict | None = None, progress=None):
        from dg_quantize.roles import Precision

        self.checkpoint = checkpoint
        self.precision = precision or Precision("fp32")
        self.expected_shapes = expected_shapes or {}
        self.progress = progress
        self.locations: dict[tuple[str, str], dict[str, Location]] = {}  # (source, layout) -> parts
        self.schemes: dict[str, Scheme] = {}  # source -> how it is stored, for the manifest
        self.file = open(path, "wb")

    def close(self):
        self.file.close()

    def check_shapes(self) -> None:
        """Every tensor the config implies is in the checkpoint (under its own name or a tied one) with the shape
        the config implies: checked from the shard headers before anything is written."""
        from dg_runtime.errors import UserError

        for name, shape in self.expected_shapes.items():
            stored = self.resolve(name)
            if stored not in self.checkpoint:
                raise UserError(f"the checkpoint has no tensor {name!r}: it does not match its config.json")
            if self.checkpoint.shape(stored) != tuple(shape):
                raise UserError(f"tensor {stored} has shape {list(self.checkpoint.shape(stored))}, the config implies "
                                f"{list(shape)}: the weights do not match config.json")

    def resolve(self, name: str) -> str:
        if name in self.checkpoint:
            return name
        for a, b in ALIASES:
            for src, dst in ((a, b), (b, a)):
                if name.startswith(src) and name.replace(src, dst, 1) in self.checkpoint:
                    return name.replace(src, dst, 1)
        return name  # Checkpoint.read says it is missing

    def scheme(self, source: str) -> Scheme:
        return self.precision.scheme(source, self.checkpoint.shape(self.resolve(source)))

    def tensor(self, source: str, layout: str = "as_is", rows: tuple[int, int] | None = None) -> TensorProto:
        """An initializer for a float-stored `source` (see `parts`)."""
        return self.parts(source, layout, rows)["weight"]

    def parts(self, source: str, layout: str = "as_is", rows: tuple[int, int] | None = None,
              index: int | None = None) -> dict[str, TensorProto]:
        """Initializers for `source` in `layout`, their bytes in the weights file (written on first request):
        "weight", and for quantized tensors "scale" (and "zero" for asymmetric int4). `rows` narrows them to a
        range of their first axis, `index` to one entry of it (one expert), both contiguous in the file."""
        key = (source, layout)
        if key not in self.locations:
            self.locations[key] = self._write(source, layout)
        return {part: location.proto(rows, index) for part, location in self.locations[key].items()}

    def _write(self, source: str, layout: str) -> dict[str, "Location"]:
        """Append one tensor in chunks of rows (of experts, for a 3-D expert weight), so that memory holds a chunk,
        not the tensor; only a 2-D matrix that must be transposed is read whole. Quantization scales and zero
        points are gathered as the chunks go and appended after the values."""
        stored = self.resolve(source)
        shape = layout_shape(layout, self.checkpoint.shape(stored))
        scheme = self.schemes[source] = self.scheme(source)
        name = source if layout == "as_is" else f"{source}.{layout}"
        transpose = transposed(layout, scheme)
        values = self._start()
        extra: dict[str, list] = {}
        for start, stop in row_chunks(shape, whole=transpose and len(shape) == 2):
            chunk = layout_rows(layout, self.checkpoint.read(stored, start, stop))
            data, side = encode(chunk, scheme)
            read_bytes = chunk.size * 4
            del chunk
            if transpose:
                data = np.swapaxes(data, -1, -2)
            data = np.ascontiguousarray(data)
            self.file.write(memoryview(data).cast("B"))
            for part, array in side.items():
                extra.setdefault(part, []).append(array)
            if self.progress is not None:
                self.progress.update(read_bytes)
        if scheme.format == "int4":
            out_shape = (*shape[:-1], shape[-1] // scheme.group, scheme.group // 2)
        else:
            out_shape = (*shape[:-2], shape[-1], shape[-2]) if transpose else shape
        parts = {"weight": Location(name if not scheme.quantized else f"{name}.{scheme.format}", values,
                                    self.file.tell() - values, data.dtype, out_shape)}
        for part, arrays in extra.items():
            array = np.ascontiguousarray(np.concatenate(arrays))
            offset = self._start()
            self.file.write(memoryview(array).cast("B"))
            parts[part] = Location(f"{name}.{part}", offset, array.nbytes, array.dtype, array.shape)
        return parts

    def _start(self) -> int:
        self.file.write(b"\0" * (-self.file.tell() % ALIGNMENT))
        return self.file.tell()

    def stored_bytes(self) -> int:
        return sum(loc.length for parts in self.locations.values() for loc in parts.values())


def layout_rows(layout: str, array: np.ndarray) -> np.ndarray:
    """The part of a checkpoint tensor's rows a layout stores: one half of a stacked tensor, or all of it."""
    if layout not in HALVES:
        return array
    half = array.shape[-2] // 2
    return array[..., HALVES[layout] * half: (HALVES[layout] + 1) * half, :]


def layout_shape(layout: str, shape: tuple) -> tuple:
    return (*shape[:-2], shape[-2] // 2, shape[-1]) if layout in HALVES else tuple(shape)


def transposed(layout: str, scheme: Scheme) -> bool:
    """Whether a tensor is stored with its last two axes swapped: linear weights, except int4 (MatMulNBits reads
    [out, in] as the checkpoint has it)."""
    return layout == "linear" and scheme.format != "int4"


def encode(chunk: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A chunk of checkpoint rows in its stored form, and its quantization side data (scale, zero point).

    int8 matrices are int8 with a scale per output channel (the embedding: per row, as the checkpoint has it).
    """
    if scheme.format in STORED:
        return chunk.astype(STORED[scheme.format if chunk.ndim > 1 else "fp32"][0], copy=False), {}
    if scheme.format == "int8":
        q, scale = int8_channels(chunk)
        return q, {"scale": scale}
    lead = chunk.shape[:-2]
    packed, scale, zero = int4_groups(chunk.reshape(-1, chunk.shape[-1]), scheme.group, scheme.sym)
    rows = chunk.shape[-2]
    side = {"scale": scale.reshape(*lead, rows, -1)}
    if zero is not None:
        side["zero"] = zero.reshape(*lead, rows, -1)
    return packed.reshape(*lead, rows, *packed.shape[1:]), side


def decode(parts: dict[str, np.ndarray], scheme: Scheme, layout: str) -> tuple[np.ndarray, np.ndarray | float]:
    """Stored rows back in the checkpoint's layout, in float64, and how far each may be from the checkpoint's value
    (half a quantization step; 0 for floats): the inverse of `encode`, for checking the weights file."""
    data = parts["weight"]
    if not scheme.quantized:
        return (np.swapaxes(data, -1, -2) if layout == "linear" else data).astype(np.float64), 0.0
    scale = parts["scale"]
    if scheme.format == "int8":
        rows = np.swapaxes(data, -1, -2) if layout == "linear" else data
        return dequantize_int8(rows, scale), scale[..., None].astype(np.float64) / 2
    lead, rows = data.shape[:-3], data.shape[-3]
    flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])  # noqa: E731
    values = dequantize_int4(data.reshape(-1, *data.shape[-2:]), flat(scale), flat(parts.get("zero")))
    step = np.repeat(flat(scale).astype(np.float64), scheme.group, axis=-1) / 2
    return values.reshape(*lead, rows, -1), step.reshape(*lead, rows, -1)


def stored_size(shape: tuple, scheme: Scheme) -> int:
    """Bytes `encode` writes for a tensor (and its scales): what --dry-run adds up per recipe."""
    count = int(np.prod(shape))
    if len(shape) < 2 or scheme.format == "fp32":
        return 4 * count
    if scheme.format == "fp16":
        return 2 * count
    if scheme.format == "int8":
        return count + 4 * (count // shape[-1])  # a scale per row (of the checkpoint's [out, in])
    groups = count // scheme.group
    return count // 2 + 2 * groups * (1 if scheme.sym else 2)


class Location:
    """Where one stored array lives in the weights file, and initializers for it or for rows of it."""

    def __init__(self, name: str, offset: int, length: int, dtype, shape: tuple):
        self.name, self.offset, self.length = name, offset, length
        self.dtype, self.shape = np.dtype(dtype), tuple(shape)

    def proto(self, rows: tuple[int, int] | None = None, index: int | None = None) -> TensorProto:
        name, offset, length, shape = self.name, self.offset, self.length, self.shape
        if rows is not None or index is not None:
            first, last = rows if rows is not None else (index, index + 1)
            row_bytes = length // shape[0]
            offset, length = offset + first * row_bytes, (last - first) * row_bytes
            name = f"{name}[{first}:{last}]" if index is None else f"{name}[{index}]"
            shape = (last - first, *shape[1:]) if index is None else shape[1:]
        tensor = TensorProto(name=name, data_type=ONNX_TYPES[self.dtype], dims=shape)
        tensor.data_location = TensorProto.EXTERNAL
        for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=k, value=v)
        return tensor


def expected_shapes(config, images: bool = False) -> dict[str, tuple]:
    """Every text tensor's shape (and the vision tower's, with `images`) as transformers builds it from the config
    (on the meta device: no memory)."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)
    tied_head = getattr(config, "tie_word_embeddings", True)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()
            if (images or "vision" not in name) and not (tied_head and name == "lm_head.weight")}


def progress_bar(total: int, description: str, unit: str = "B"):
    """A bar on stderr with rate and ETA (hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=description, file=sys.stderr, leave=False,
                disable=None, dynamic_ncols=True)


def external_location(tensor: TensorProto) -> tuple[str, int, int]:
    """(file, offset, length) of an initializer stored in the weights file."""
    entries = {e.key: e.value for e in tensor.external_data}
    return entries["location"], int(entries["offset"]), int(entries["length"])


def weights_as_inputs(model):
    """A copy of a graph in which the initializers stored in the weights file are graph inputs instead (OpenVINO
    converts such a copy without reading any weight; validation feeds the weights from memory it already holds).
    Returns the copy and those initializers by name."""
    import onnx

    external = {t.name: t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    del twin.graph.initializer[:]
    twin.graph.initializer.extend(t for t in model.graph.initializer if t.name not in external)
    for tensor in external.values():
        twin.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return twin, external
