"""The built graphs against transformers, on ONNX Runtime and OpenVINO (fp32, atol 1e-4)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import CONFIGS
from dg_export import export
from dg_export.validate import validate
from dg_runtime.artifact import load_manifest

ROOT = Path(__file__).resolve().parent.parent

ATOL = 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("prompt_length, chunk_length, batch", [(1, 1, 1), (7, 3, 2), (None, 5, 2)])
def test_graphs_match_transformers(exported, hf_model, name, prompt_length, chunk_length, batch):
    checkpoint, artifact = exported(name)
    model = hf_model(checkpoint)
    manifest = load_manifest(artifact)
    rows = validate(model, artifact, manifest, ["onnxruntime", "openvino"], ATOL, batch=batch,
                    prompt_length=prompt_length, chunk_length=chunk_length, seed=1)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad
    assert {r["backend"] for r in rows} == {"onnxruntime", "openvino"}


def test_artifact_is_self_describing_and_stores_weights_once(exported, hf_model):
    checkpoint, artifact = exported("gqa-window12")
    manifest = load_manifest(artifact, verify_checksums=True)
    assert manifest["modalities"] == ["text"]
    assert set(manifest["graphs"]) == {"model"}  # the encoder and the denoiser share one graph and its weights
    params = sum(p.numel() for n, p in hf_model(checkpoint).named_parameters() if "vision" not in n)
    # one weights file for both modes and both formats, about 1x the fp32 parameter bytes
    assert manifest["formats"]["onnx"]["weights"] == manifest["formats"]["openvino"]["weights"] == "model.bin"
    weights = (artifact / "model.bin").stat().st_size
    assert 4 * params <= weights <= 1.05 * 4 * params, (weights, 4 * params)
    for graph in manifest["formats"]["onnx"]["graphs"].values():  # no second copy of a weight inside a graph
        model = onnx.load(str(artifact / graph), load_external_data=False)
        inline = [t.name for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
                  and len(t.raw_data) >= 1024]
        assert not inline, inline
    graph_files = {"model.onnx", "model.xml", "model.bin"}
    assert graph_files <= {p.name for p in artifact.iterdir()}
    assert all(np.isfinite(r["diff"]) and r["ok"] for r in manifest["validation"]["results"])


def test_openvino_tools_open_the_ir_without_a_weights_path(demo_artifact):
    """model.bin sits beside model.xml under its name: read_model and benchmark_app take the IR as it is."""
    import openvino as ov

    model = ov.Core().read_model(str(demo_artifact / "model.xml"))
    assert {i.get_any_name() for i in model.inputs} >= {"input_ids", "soft_embedding", "past.0.key"}
    line = subprocess.run([sys.executable, str(ROOT / "bench" / "benchmark_app.py"), str(demo_artifact), "--past", "40",
                           "--run"], capture_output=True, text=True, timeout=300)
    assert line.returncode == 0, line.stdout[-2000:] + line.stderr[-2000:]
    assert "Median:" in line.stdout, line.stdout[-2000:]


def test_head_in_chunks_matches_transformers(tmp_path, hf_model, monkeypatch):
    """The ONNX head as a Loop over row chunks (what large vocabularies get), forced on a tiny model: chunks of 8
    canvas rows, and a batch row at a time when encoding."""
    from conftest import make_checkpoint
    from dg_export import builder, graphs

    monkeypatch.setattr(graphs, "LARGE_HEAD_BYTES", 0)
    monkeypatch.setattr(builder, "HEAD_CHUNK", 8)
    checkpoint = make_checkpoint(tmp_path / "checkpoint", "window8-top2")
    artifact = tmp_path / "chunked.dg"
    export(checkpoint, artifact, validation=None)
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    assert [n.op_type for n in graph.node].count("Loop") == 1
    assert "logits" not in [o.name for o in graph.output]  # a large head's logits are no output
    for prompt_length, batch in ((1, 1), (11, 2)):
        rows = validate(hf_model(checkpoint), artifact, load_manifest(artifact), ["onnxruntime"], ATOL, batch=batch,
                        prompt_length=prompt_length, chunk_length=3, seed=2)
        assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_prompt_encoded_in_chunks_matches_transformers(exported, hf_model, backend):
    """The runtime encodes long prompts a chunk at a time: the KV (sliding layers trimmed between chunks) and the
    next token must be transformers' for the whole prompt at once."""
    import torch
    from transformers import DynamicCache

    from dg_export import reference
    from dg_export.validate import compare
    from dg_runtime.backends import open_graph
    from dg_runtime.graph import ModelGraph
    from dg_runtime.kv_cache import KVCache

    checkpoint, artifact = exported("window8-top2")  # a window of 8: chunks of 7 cross it
    model, manifest = hf_model(checkpoint), load_manifest(artifact)
    text = model.config.text_config
    prompt = np.random.default_rng(3).integers(0, text.vocab_size, (2, 40))
    cache = DynamicCache(config=text)
    with torch.no_grad():
        want_next = reference.encode(model, cache, prompt, 0).argmax(-1)
    graph = ModelGraph(open_graph(artifact, manifest, backend, precision="f32"), text.hidden_size, encode_chunk=7)
    kv = KVCache(manifest["model"]["kv_layout"], text.sliding_window, 2)
    got_next = graph.encode(kv, prompt)
    assert max(compare(w, t) for w, t in zip(reference.cache_arrays(cache), kv.tensors)) <= ATOL
    assert np.array_equal(got_next, want_next)
