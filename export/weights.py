"""The artifact's one weights file: checkpoint tensors streamed in as the graphs ask for them.

Each tensor is read from the checkpoint, laid out for the graph (linear weights as [in, out]), converted to the
recipe's stored precision, appended at a 64-byte-aligned offset and released. Both graphs and both formats point
at the same bytes: a tensor the encoder and the denoiser share is written once.
"""

import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto

ALIGNMENT = 64  # bytes; lets a runtime map tensors straight from the file
WEIGHTS_FILE = "weights.bin"
STORED = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}
STORED_BYTES = {"fp32": 4, "fp16": 2}
# Tensors transformers ties to others; a checkpoint stores one name of each pair.
ALIASES = (("model.encoder.language_model.", "model.decoder."),)


class Weights:
    def __init__(self, path: Path, checkpoint, precision: str = "fp32", expected_shapes: dict | None = None,
                 progress=None):
        self.path, self.checkpoint, self.precision = Path(path), checkpoint, precision
        self.expected_shapes = expected_shapes or {}
        self.progress = progress
        self.locations: dict[tuple[str, str], tuple[str, int, int, np.dtype, tuple]] = {}
        self.file = open(self.path, "wb")
        self.written = 0

    def close(self):
        self.file.close()

    def resolve(self, name: str) -> str:
        if name in self.checkpoint:
            return name
        for a, b in ALIASES:
            for src, dst in ((a, b), (b, a)):
                if name.startswith(src) and name.replace(src, dst, 1) in self.checkpoint:
                    return name.replace(src, dst, 1)
        return name  # Checkpoint.read says it is missing

    def tensor(self, source: str, layout: str = "as_is") -> TensorProto:
        """An initializer for `source` in `layout`, its bytes in the weights file (written on first request)."""
        key = (source, layout)
        if key not in self.locations:
            self.locations[key] = self._write(source, layout)
        name, offset, length, dtype, shape = self.locations[key]
        tensor = TensorProto(name=name, data_type=dtype, dims=shape)
        tensor.data_location = TensorProto.EXTERNAL
        for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=k, value=v)
        return tensor

    def _write(self, source: str, layout: str):
        from dg_runtime.errors import UserError

        stored = self.resolve(source)
        array = self.checkpoint.read(stored)
        expected = self.expected_shapes.get(source)
        if expected is not None and tuple(array.shape) != tuple(expected):
            raise UserError(f"tensor {stored} has shape {list(array.shape)}, the config implies {list(expected)}: "
                            "the weights do not match config.json")
        if layout == "linear":
            array = np.swapaxes(array, -1, -2)
        np_dtype, onnx_dtype = STORED[self.precision] if array.ndim > 1 else STORED["fp32"]
        data = np.ascontiguousarray(array, dtype=np_dtype)
        del array
        self.file.write(b"\0" * (-self.file.tell() % ALIGNMENT))
        offset = self.file.tell()
        self.file.write(memoryview(data).cast("B"))
        if self.progress is not None:
            self.progress.update(data.nbytes)
        name = source if layout == "as_is" else f"{source}.{layout}"
        return name, offset, data.nbytes, onnx_dtype, tuple(data.shape)


def expected_shapes(config) -> dict[str, tuple]:
    """Every text tensor's shape as transformers builds it from the config (on the meta device: no memory)."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items() if "vision" not in name}
    return shapes


def progress_bar(total: int, description: str, unit: str = "B"):
    """A bar on stderr with rate and ETA (hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=description, file=sys.stderr, leave=False,
                disable=None, dynamic_ncols=True)
