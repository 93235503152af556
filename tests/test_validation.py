"""Validation judges the export, not the model's conditioning or the check's own rounding."""

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from dg_export.builtin import build_checkpoint
from dg_export import export
from dg_runtime.artifact import load_manifest

ILL_CONDITIONED = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3, "sliding_window": 16,
                   "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}


def test_an_ill_conditioned_model_exports(tmp_path):
    """Every matrix drawn with std 0.2: float32 transformers itself is more than 1e-4 from float64, and so is an exact
    graph. It must export (it was refused at a constant 1e-4 against float32 transformers)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    folder = build_checkpoint(tmp_path / "checkpoint", ILL_CONDITIONED, canvas_length=32)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2 and "vision" not in name:
                parameter.normal_(0, 0.2)
    model.save_pretrained(folder)
    export(folder, tmp_path / "out.dg")
    rows = load_manifest(tmp_path / "out.dg")["validation"]["results"]
    floats = [r for r in rows if "float32_error" in r]
    assert max(r["diff"] for r in floats) > 1e-4  # what a constant tolerance refused
    assert all(r["ok"] and r["diff"] <= r["bound"] for r in rows)
    assert all(r["float32_error"] > 0 for r in floats)  # the float64 reference is not the float32 one


def test_a_value_half_a_step_from_two_grid_points_passes_the_int8_check(tmp_path, capsys):
    """A row with max 0.2330751568 and a value 101.5 steps from 0: float32's quotient rounds to exactly 101.5 and
    the value lands on 101, half a step plus 3e-6 of a step away, which float32 arithmetic in the check judged past
    half a step (1 + 1e-5 allowed)."""
    folder = build_checkpoint(tmp_path / "checkpoint", {"num_hidden_layers": 2,
                                                        "layer_types": ["sliding_attention", "full_attention"]},
                              canvas_length=32)
    tensors = load_file(folder / "model.safetensors")
    gate = tensors["model.decoder.layers.0.mlp.gate_proj.weight"]
    gate[0, :2] = [np.float32(0.23307515680789948), np.float32(0.1862765997648239)]
    assert np.abs(gate[0, 2:]).max() < gate[0, 0]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    scale = np.float32(gate[0, 0]) / np.float32(127)
    assert np.float32(gate[0, 1]) / scale == np.float32(101.5)  # the tie the test is about

    export(folder, tmp_path / "int8.dg", weight_format="int8", validation="by-layer", formats=["onnx"])
    (row,) = load_manifest(tmp_path / "int8.dg")["validation"]["results"]
    assert row["ok"] and row["diff"] == 0
