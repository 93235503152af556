"""The built graphs against transformers, on ONNX Runtime and OpenVINO (fp32, atol 1e-4)."""

import numpy as np
import onnx
import pytest

from conftest import CONFIGS
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


def test_artifact_is_self_describing_and_stores_weights_once(exported, hf_model):
    checkpoint, artifact = exported("gqa-window12")
    manifest = load_manifest(artifact, verify_checksums=True)
    assert manifest["modalities"] == ["text"]
    assert set(manifest["graphs"]) == {"model"}  # the encoder and the denoiser share one graph and its weights
    params = sum(p.numel() for n, p in hf_model(checkpoint).named_parameters() if "vision" not in n)
    # one weights file for both modes and both formats, about 1x the fp32 parameter bytes
    assert manifest["formats"]["onnx"]["weights"] == manifest["formats"]["openvino"]["weights"] == "weights.bin"
    weights = (artifact / "weights.bin").stat().st_size
    assert 4 * params <= weights <= 1.05 * 4 * params, (weights, 4 * params)
    for graph in manifest["formats"]["onnx"]["graphs"].values():  # no second copy of a weight inside a graph
        model = onnx.load(str(artifact / graph), load_external_data=False)
        inline = [t.name for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
                  and len(t.raw_data) >= 1024]
        assert not inline, inline
    graph_files = {"model.onnx", "model.xml", "weights.bin"}
    assert graph_files <= {p.name for p in artifact.iterdir()}
    assert all(np.isfinite(r["diff"]) and r["ok"] for r in manifest["validation"]["results"])
