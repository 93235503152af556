"""Trace the encoder and the denoiser to ONNX and store their weights once, in one shared file."""

import hashlib
import warnings
from pathlib import Path

import onnx
import torch
from onnx.external_data_helper import set_external_data

from .graphs import dynamic_shapes, example_inputs
from .modules import Denoiser, Encoder

WEIGHTS_FILE = "weights.bin"
ALIGNMENT = 64  # bytes; lets a runtime map tensors straight from the file
INLINE_BYTES = 1024  # smaller constants stay inside the graph


def trace(model, graph: str, spec: dict, path: Path) -> None:
    """torch.onnx.export (dynamo) of one graph; its weights land in `<path>.data` until `share_weights`."""
    module = {"encoder": Encoder, "denoiser": Denoiser}[graph](model).eval()
    args = example_inputs(spec, model.config.text_config.vocab_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=[e["name"] for e in spec["inputs"]],
            output_names=[e["name"] for e in spec["outputs"]],
            dynamic_shapes=dynamic_shapes(spec),
            dynamo=True,
            external_data=True,
            optimize=False,  # onnxscript's optimizer is superlinear in graph size; ORT and OpenVINO optimize at load
            verbose=False,
        )


def share_weights(folder: Path, graph_files: list[str]) -> None:
    """Rewrite the graphs so that identical initializers point at one copy in WEIGHTS_FILE.

    Tied and shared parameters (the encoder and the denoiser use the same layers and embedding) are found by
    content, so nothing depends on how the exporter named them.
    """
    offsets: dict[str, tuple[int, int]] = {}
    with open(folder / WEIGHTS_FILE, "wb") as weights:
        for name in graph_files:
            model = onnx.load(str(folder / name), load_external_data=True)
            for tensor in model.graph.initializer:
                data = tensor.raw_data
                if len(data) < INLINE_BYTES:
                    continue
                key = hashlib.sha256(data).hexdigest()
                if key not in offsets:
                    weights.write(b"\0" * (-weights.tell() % ALIGNMENT))
                    offsets[key] = (weights.tell(), len(data))
                    weights.write(data)
                set_external_data(tensor, WEIGHTS_FILE, *offsets[key])
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
            onnx.save(model, str(folder / name))
            (folder / f"{name}.data").unlink(missing_ok=True)
