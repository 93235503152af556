"""The streaming exporter on sharded bf16 checkpoints: graphs built from the config, weights read one tensor at a
time, validated whole or layer by layer, and validation that fails when a graph is wrong."""

import json

import numpy as np
import pytest

from conftest import BASE, CONFIGS
from dg_export import builder
from dg_export.builtin import tiny_config
from dg_export.checkpoint import Checkpoint
from dg_export import export
from dg_export.cli import main as dg_export
from dg_export.synthetic import write_checkpoint
from dg_runtime import DiffusionGemma, Settings
from dg_runtime.artifact import load_manifest


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A bf16 checkpoint of the gqa-window12 shape in shards of at most 64 KB, with its index."""
    overrides, canvas = CONFIGS["gqa-window12"]
    config = tiny_config({**BASE, **overrides, "num_hidden_layers": len(overrides["layer_types"])}, canvas)
    folder = write_checkpoint(tmp_path_factory.mktemp("sharded") / "model", config, dtype="bf16",
                              shard_bytes=64 << 10)
    assert len(list(folder.glob("*.safetensors"))) > 5
    return folder


@pytest.mark.parametrize("mode", ["full", "by-layer"])
def test_sharded_bf16_checkpoint_streams_and_validates(sharded, tmp_path, monkeypatch, mode):
    reads = []
    original = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, name, *rows: reads.append(name) or original(self, name, *rows))
    out = tmp_path / "out.dg"
    export(sharded, out, validation=mode)
    manifest = load_manifest(out)
    assert manifest["validation"]["mode"] == mode
    assert all(r["ok"] for r in manifest["validation"]["results"])
    graphs = {r["graph"] for r in manifest["validation"]["results"]}
    if mode == "by-layer":
        assert {"encoder.layers.3", "decoder.layers.0", "canvas_embedding", "head"} <= graphs
    # while streaming, every stored tensor was read exactly once (the encoder's tied layers were not read again)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    streamed = reads[:len(index)]
    assert sorted(streamed) == sorted(index)
    # the bf16 weights were widened exactly: model.bin holds them as fp32
    params = sum(int(np.prod(Checkpoint(sharded).shape(n))) for n in index)
    assert (out / "model.bin").stat().st_size >= 4 * params
    done = DiffusionGemma(out).generate([[5, 6, 7]], settings=Settings(max_new_tokens=8, max_denoising_steps=4), seed=0)
    assert done.tokens.shape == (1, 8)


def test_validation_by_layer_on_samples_of_experts_and_vocabulary(sharded, tmp_path, monkeypatch):
    """With samples smaller than the model (2 of 6 experts, rotating over layers; 100 of 264 tokens)."""
    from dg_export import validate

    monkeypatch.setattr(validate, "EXPERT_SAMPLE", 2)
    monkeypatch.setattr(validate, "VOCAB_SAMPLE", 100)
    out = tmp_path / "out.dg"
    export(sharded, out, validation="by-layer")
    assert all(r["ok"] for r in load_manifest(out)["validation"]["results"])


def test_validation_by_layer_finds_a_corrupted_tensor(sharded, tmp_path, monkeypatch, capsys):
    """A tensor streamed wrongly (once) is caught by the byte check against the checkpoint."""
    original, seen = Checkpoint.read, []

    def corrupt_first_read(self, name, *rows):
        array = original(self, name, *rows)
        if name.endswith("layers.1.experts.down_proj") and name not in seen:
            seen.append(name)
            array = array + 1e-3
        return array

    monkeypatch.setattr(Checkpoint, "read", corrupt_first_read)
    assert dg_export([str(sharded), "-o", str(tmp_path / "out.dg"), "--validation", "by-layer",
                      "--format", "onnx"]) == 2
    assert "weights file" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["full", "by-layer"])
def test_validation_fails_on_a_wrong_graph(sharded, tmp_path, monkeypatch, capsys, mode):
    """A dense MLP that applies GELU to the up projection instead of the gate: both validations must catch it."""
    def swapped_mlp(g, x, prefix):
        up = builder.gelu_tanh(g, g.linear(x, f"{prefix}.up_proj.weight"))
        return g.linear(g.op("Mul", up, g.linear(x, f"{prefix}.gate_proj.weight")), f"{prefix}.down_proj.weight")

    monkeypatch.setattr(builder, "mlp", swapped_mlp)
    out = tmp_path / "out.dg"
    assert dg_export([str(sharded), "-o", str(out), "--validation", mode, "--format", "onnx"]) == 2
    assert "validation failed" in capsys.readouterr().err
    assert not out.exists()


def test_validation_by_layer_fails_on_a_wrong_window(sharded, tmp_path, monkeypatch, capsys):
    """A sliding window one token too wide changes only the encoder's masked layers."""
    original = builder.causal_mask
    monkeypatch.setattr(builder, "causal_mask",
                        lambda g, pos, past, window, *rest: original(g, pos, past, window and window + 1, *rest))
    assert dg_export([str(sharded), "-o", str(tmp_path / "out.dg"), "--validation", "by-layer",
                      "--format", "onnx"]) == 2
    assert "validation failed" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["full", "by-layer"])
def test_fp16_weights_recipe(sharded, tmp_path, mode):
    """Matrices stored in fp16 (half the bytes), validated against transformers with the same fp16 weights."""
    fp32, fp16 = tmp_path / "fp32.dg", tmp_path / "fp16.dg"
    export(sharded, fp32, validation=None)
    export(sharded, fp16, recipe="openvino-fp16", validation=mode)
    manifest = load_manifest(fp16)
    assert manifest["precision"] == "fp16" and all(r["ok"] for r in manifest["validation"]["results"])
    ratio = (fp16 / "model.bin").stat().st_size / (fp32 / "model.bin").stat().st_size
    assert 0.5 <= ratio < 0.55, ratio
    for backend in ("onnxruntime", "openvino"):
        done = DiffusionGemma(fp16, backend=backend).generate([[5, 6, 7]], settings=Settings(max_new_tokens=8), seed=0)
        assert done.tokens.shape == (1, 8)


def test_synthetic_source_streams_what_a_written_checkpoint_holds(tmp_path):
    """`synthetic:FOLDER` generates the tensors chunk by chunk; the same tensors written to shards and exported from
    disk give a byte-identical weights file."""
    from dg_export.synthetic import write_config

    overrides, canvas = CONFIGS["window8-top2"]
    config = tiny_config({**BASE, **overrides, "num_hidden_layers": len(overrides["layer_types"])}, canvas)
    write_config(tmp_path / "shape", config)
    export(f"synthetic:{tmp_path / 'shape'}", tmp_path / "synthetic.dg")
    manifest = load_manifest(tmp_path / "synthetic.dg")
    assert manifest["validation"]["mode"] == "by-layer" and all(r["ok"] for r in manifest["validation"]["results"])
    written = write_checkpoint(tmp_path / "written", config, shard_bytes=16 << 10,
                               embedding_std=5 / config.text_config.hidden_size ** 0.5)
    export(written, tmp_path / "written.dg", formats=["onnx"], validation=None)
    onnx_only = (tmp_path / "written.dg" / "model.bin").read_bytes()
    assert (tmp_path / "synthetic.dg" / "model.bin").read_bytes()[:len(onnx_only)] == onnx_only
