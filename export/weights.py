"""The artifact's one weights file: checkpoint tensors streamed in as the graphs ask for them.

Each tensor is read from the checkpoint, laid out for the graph (linear weights as [in, out]), converted to the
recipe's stored precision, appended at a 64-byte-aligned offset and released. Both graphs and both formats point
at the same bytes: a tensor the encoder and the denoiser share is written once.
"""

import sys
from pathlib import Path
import numpy as np
from onnx import TensorProto

from .checkpoint import row_chunks

ALIGNMENT = 64  # bytes; lets a runtime map tensors straight from the file
WEIGHTS_FILE = "weights.bin"
STORED = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}
# Tensors transformers ties to others; a checkpoint stores one name of each pair.
ALIASES = (("model.encoder.language_model.", "model.decoder."),)


class Weights:
    def __init__(self, path: Path, checkpoint, precision: str = "fp32", expected_shapes: dict | None = None,
                 progress=None):
        self.checkpoint, self.precision = checkpoint, precision
        self.expected_shapes = expected_shapes or {}
        self.progress = progress
        self.locations: dict[tuple[str, str], tuple[str, int, int, np.dtype, tuple]] = {}
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

    def tensor(self, source: str, layout: str = "as_is", rows: tuple[int, int] | None = None) -> TensorProto:
        """An initializer for `source` in `layout`, its bytes in the weights file (written on first request);
        `rows` narrows it to a range of its first axis, which is contiguous in the file."""
        key = (source, layout)
        if key not in self.locations:
            self.locations[key] = self._write(source, layout)
        name, offset, length, dtype, shape = self.locations[key]
        if rows is not None:
            row_bytes = length // shape[0]
            name, offset, length = f"{name}[{rows[0]}:{rows[1]}]", offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        tensor = TensorProto(name=name, data_type=dtype, dims=shape)
        tensor.data_location = TensorProto.EXTERNAL
        for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=k, value=v)
        return tensor

    def _write(self, source: str, layout: str):
        """Append one tensor in chunks of rows (of experts, for a 3-D expert weight), so that memory holds a chunk,
        not the tensor; only a 2-D matrix that must be transposed is read whole."""
        stored = self.resolve(source)
        shape = self.checkpoint.shape(stored)
        np_dtype, onnx_dtype = STORED[self.precision] if len(shape) > 1 else STORED["fp32"]
        self.file.write(b"\0" * (-self.file.tell() % ALIGNMENT))
        offset = self.file.tell()
        for start, stop in row_chunks(shape, whole=layout == "linear" and len(shape) == 2):
            chunk = self.checkpoint.read(stored, start, stop)
            if layout == "linear":
                chunk = np.swapaxes(chunk, -1, -2)
            data = np.ascontiguousarray(chunk, dtype=np_dtype)
            del chunk
            self.file.write(memoryview(data).cast("B"))
            if self.progress is not None:
                self.progress.update(data.nbytes)
        out_shape = (*shape[:-2], shape[-1], shape[-2]) if layout == "linear" else shape
        name = source if layout == "as_is" else f"{source}.{layout}"
        return name, offset, self.file.tell() - offset, onnx_dtype, tuple(out_shape)


def expected_shapes(config) -> dict[str, tuple]:
    """Every text tensor's shape as transformers builds it from the config (on the meta device: no memory)."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)
    tied_head = getattr(config, "tie_word_embeddings", True)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()
            if "vision" not in name and not (tied_head and name == "lm_head.weight")}


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
