"""An fp32 or fp16 artifact read back as a checkpoint, so that it can be quantized without the original weights.

The artifact's ONNX graphs say where each checkpoint tensor lies in weights.bin and in which layout (`NAME` as the
checkpoint stores it, `NAME.linear` with its last two axes swapped); reads return the checkpoint's layout in
float32, a range of rows at a time, as `dg_export.checkpoint.Checkpoint` does.
"""

from pathlib import Path

import numpy as np

from dg_runtime.artifact import MANIFEST_NAME, load_manifest
from dg_runtime.errors import UserError

from .schemes import FLOAT_FORMATS


def is_artifact(folder: Path) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


class ArtifactCheckpoint:
    def __init__(self, folder: Path):
        import onnx

        from dg_export.weights import NUMPY_TYPES, external_location

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
