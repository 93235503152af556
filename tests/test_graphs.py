"""The exported graphs against transformers' modules, on ONNX Runtime and OpenVINO (fp32, atol 1e-4)."""

import numpy as np
import onnx
import pytest
import torch
from transformers import DynamicCache

from conftest import CONFIGS
from dg_export.graphs import kv_layout
from dg_export.modules import Denoiser, Encoder
from dg_export.onnx_graphs import INLINE_BYTES
from dg_export.validate import validate
from dg_runtime.artifact import load_manifest

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


def test_export_friendly_modules_equal_transformers(exported, hf_model):
    """The traced modules themselves (unrolled experts, explicit KV) against transformers' forward."""
    checkpoint, _ = exported("window8-top2")
    model = hf_model(checkpoint)
    text = model.config.text_config
    ids = torch.randint(0, text.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = DynamicCache(config=text)
        model.model.encoder(input_ids=ids, past_key_values=cache, position_ids=torch.arange(11)[None])
        empty = [torch.zeros(2, layer["kv_heads"], 0, layer["head_dim"]) for layer in kv_layout(text) for _ in range(2)]
        presents = Encoder(model)(ids, torch.arange(11)[None].expand(2, 11), *empty)
        for i, layer in enumerate(cache.layers):
            kept = layer.keys.shape[2]
            assert torch.allclose(presents[2 * i][:, :, -kept:], layer.keys, atol=1e-5)
            assert torch.allclose(presents[2 * i + 1][:, :, -kept:], layer.values, atol=1e-5)

        canvas = torch.randint(0, text.vocab_size, (2, model.config.canvas_length))
        positions = torch.arange(11, 11 + canvas.shape[1])[None]
        expected = model(decoder_input_ids=canvas, past_key_values=cache, decoder_position_ids=positions).logits
        past = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        soft = torch.zeros(2, canvas.shape[1], text.hidden_size)
        outputs = Denoiser(model)(canvas, soft, positions.expand(2, -1), torch.tensor(1.0), torch.rand(2, canvas.shape[1]), *past)
        assert torch.allclose(outputs[-1], expected, atol=1e-5)


def test_artifact_is_self_describing_and_stores_weights_once(exported, hf_model):
    checkpoint, artifact = exported("gqa-window12")
    manifest = load_manifest(artifact, verify_checksums=True)
    assert manifest["modalities"] == ["text"]
    assert set(manifest["graphs"]) == {"encoder", "denoiser"}
    params = sum(p.numel() for n, p in hf_model(checkpoint).named_parameters() if "vision" not in n)
    for fmt in ("onnx", "openvino"):
        weights = (artifact / manifest["formats"][fmt]["weights"]).stat().st_size
        # about 1x the fp32 parameter bytes: constants under 1 KB (norm scales) stay inline in the graphs
        assert 0.95 * 4 * params <= weights <= 1.05 * 4 * params, (fmt, weights, 4 * params)
    for graph in manifest["formats"]["onnx"]["graphs"].values():  # no second copy of a weight inside a graph
        model = onnx.load(str(artifact / graph), load_external_data=False)
        inline = [t.name for t in model.graph.initializer
                  if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= INLINE_BYTES]
        assert not inline, inline
    assert sorted(p.name for p in (artifact / "openvino").iterdir()) == ["denoiser.xml", "encoder.xml", "weights.bin"]
    assert all(np.isfinite(r["diff"]) and r["ok"] for r in manifest["validation"]["results"])
