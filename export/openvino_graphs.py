"""OpenVINO IR for the built graphs, reading the same weights file as the ONNX graphs.

OpenVINO's converter would map (and so hold resident) every weight it reads. Instead it converts a copy of each
ONNX graph in which the checkpoint tensors are inputs; each such input is then replaced by a Constant backed by
untouched zero pages (no memory, no reads), the IR is saved, and every one of those Constants is pointed at its
real bytes in the shared weights file. The few constants of the graph itself (shapes, axes, epsilon) are appended
to that file. The IR's weights are therefore the ONNX graph's weights, byte for byte, stored once.

With the recipe's `openvino.kv_state` the KV cache becomes OpenVINO state (runtime/kv_state.py says how it is run).
"""

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import openvino as ov

from .weights import ALIGNMENT, external_location, weights_as_inputs

OV_TYPES = {onnx.TensorProto.FLOAT: ov.Type.f32, onnx.TensorProto.FLOAT16: ov.Type.f16,
            onnx.TensorProto.INT8: ov.Type.i8, onnx.TensorProto.UINT8: ov.Type.u8, onnx.TensorProto.UINT4: ov.Type.u4}


def convert(model: onnx.ModelProto, xml_path: Path, weights_path: Path, kv_state: tuple[list[dict], int] | None = None
            ) -> None:
    """Write `xml_path` whose checkpoint Constants point into `weights_path` (the IR's name-mate, model.bin, so that
    OpenVINO's tools find it); OpenVINO first saves the IR with its own .bin under a scratch name. `kv_state`:
    (kv_layout, sliding_window) to keep the KV cache in state."""
    twin, external = weights_as_inputs(model)
    twin_path = xml_path.with_suffix(".twin.onnx")
    onnx.save(twin, str(twin_path))
    try:
        ov_model = ov.Core().read_model(str(twin_path))  # the ONNX frontend alone: no converter wrapper
    finally:
        twin_path.unlink()

    largest = max(external_location(t)[2] for t in external.values())
    zeros = np.zeros(largest, dtype=np.uint8)  # calloc'd: reading it maps the shared zero page, costing nothing
    for parameter in list(ov_model.get_parameters()):
        tensor = external.get(parameter.get_friendly_name())
        if tensor is None:
            continue
        view = zeros[: external_location(tensor)[2]]
        constant = ov.op.Constant(ov.Tensor(view, ov.Shape(list(tensor.dims)), OV_TYPES[tensor.data_type]),
                                  shared_memory=True)
        constant.set_friendly_name(tensor.name)
        parameter.output(0).replace(constant.output(0))
        ov_model.remove_parameter(parameter)
    if kv_state:
        keep_kv_in_state(ov_model, *kv_state)
    ov_model.validate_nodes_and_infer_types()
    saved = xml_path.with_name(f".{xml_path.stem}.saved.xml")
    ov.save_model(ov_model, str(saved), compress_to_fp16=False)
    point_at_weights(saved, external, weights_path, xml_path)


def keep_kv_in_state(ov_model: ov.Model, kv_layout: list[dict], sliding_window: int) -> None:
    """Each `past.{i}.{key,value}` input becomes a variable of that name: read at the start of a run (initially no
    tokens, the batch of `input_ids`), written back at its end with what KVCache.append would keep: the past, then
    in causal mode the new tokens' KV (`present.*`, still outputs), a sliding layer's cut to its last window - 1."""
    from openvino import opset13 as ops
    from openvino.op.util import Variable, VariableInfo

    parameters = {p.get_friendly_name(): p for p in ov_model.get_parameters()}
    presents = {name: result.input_value(0) for result in ov_model.get_results() for name in result.output(0).get_names()}
    axis, zero, one = (ops.constant([v], np.int64) for v in (2, 0, 1))
    batch = ops.gather(ops.shape_of(parameters["input_ids"]), zero, ops.constant(0, np.int64))
    assigns = []
    for i, layer in enumerate(kv_layout):
        for part in ("key", "value"):
            name = f"past.{i}.{part}"
            info = VariableInfo()
            info.variable_id, info.data_type = name, ov.Type.f32
            info.data_shape = ov.PartialShape([-1, layer["kv_heads"], -1, layer["head_dim"]])
            variable = Variable(info)
            empty = ops.concat([batch, ops.constant([layer["kv_heads"], 0, layer["head_dim"]], np.int64)], 0)
            past = ops.read_value(ops.broadcast(ops.constant(np.float32(0)), empty), variable)
            parameters[name].output(0).replace(past.output(0))
            ov_model.remove_parameter(parameters[name])
            present = presents[f"present.{i}.{part}"]
            new_tokens = ops.select(parameters["denoising"], zero, ops.gather(ops.shape_of(present), axis, zero))
            kept = ops.concat([past, ops.slice(present, zero, new_tokens, one, axis)], 2)
            if layer["type"] == "sliding_attention":
                kept = ops.slice(kept, ops.constant([1 - sliding_window], np.int64),
                                 ops.constant([np.iinfo(np.int64).max], np.int64), one, axis)
            assigns.append(ops.assign(kept, variable))
    ov_model.add_sinks(assigns)


def point_at_weights(saved: Path, external: dict, weights_path: Path, xml_path: Path) -> None:
    """Write `xml_path`: the `saved` IR with its Const offsets rewritten, checkpoint tensors to their place in the
    weights file, the graph's own constants to copies appended there; the saved IR and its .bin are then deleted."""
    own_bin = saved.with_suffix(".bin")
    tree = ET.parse(saved)
    appended: dict[tuple[int, int], int] = {}
    with open(own_bin, "rb") as source, open(weights_path, "ab") as weights:
        for layer in tree.getroot().iter("layer"):
            data = layer.find("data")
            if layer.get("type") != "Const" or data is None or "offset" not in data.attrib:
                continue
            tensor = external.get(layer.get("name"))
            if tensor is not None:
                _, offset, length = external_location(tensor)
                assert length == int(data.get("size")), layer.get("name")
                data.set("offset", str(offset))
                continue
            span = (int(data.get("offset")), int(data.get("size")))
            if span not in appended:
                source.seek(span[0])
                weights.write(b"\0" * (-weights.tell() % ALIGNMENT))
                appended[span] = weights.tell()
                weights.write(source.read(span[1]))
            data.set("offset", str(appended[span]))
    tree.write(xml_path, encoding="utf-8", xml_declaration=True)
    own_bin.unlink()
    saved.unlink()
