"""The vision graph (export/vision.py) against transformers' own vision tower and embedder
(`get_image_features`), on both backends: images of several sizes and aspect ratios, preprocessed by
runtime/images.py, through a held-out tower (grouped KV heads, two layers, standardized features) and the demo's."""

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from dg_export.builtin import TEXT_CONFIG, TINY_VISION_CONFIG
from dg_export.checkpoint import Checkpoint
from dg_export.source import load_config
from dg_export.vision import build_vision_model
from dg_export.weights import WEIGHTS_FILE, Weights
from dg_runtime.backends import OnnxRuntimeGraph, OpenVinoGraph
from dg_runtime.images import ImageSpec, patches

TOWERS = {
    "demo": TINY_VISION_CONFIG,
    "gqa-standardized": {"model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                         "patch_size": 4, "pooling_kernel_size": 3, "position_embedding_size": 64,
                         "standardize": True},
}
SIZES = [(50, 37), (20, 90), (64, 64), (90, 31)]  # grids within the demo tower's 64-entry position table


@pytest.fixture(scope="module", params=sorted(TOWERS))
def tower(request, tmp_path_factory):
    """(transformers' model, {backend: vision graph session}, ImageSpec) for a checkpoint with this vision tower."""
    root = tmp_path_factory.mktemp(request.param)
    config = DiffusionGemmaConfig(text_config=TEXT_CONFIG, vision_config=TOWERS[request.param], canvas_length=32)
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():  # weights large enough that a wrong op shows (the default init is nearly zero)
        for name, parameter in model.named_parameters():
            if "vision" in name:
                parameter.normal_(0.0, 0.3)
        for name, buffer in model.named_buffers():
            if "std_bias" in name:
                buffer.normal_(0.0, 0.5)
            elif "std_scale" in name:
                buffer.uniform_(0.5, 2.0)
    model.save_pretrained(root / "checkpoint")
    loaded = load_config(root / "checkpoint")
    weights = Weights(root / WEIGHTS_FILE, Checkpoint(root / "checkpoint"))
    try:
        graph = build_vision_model(loaded, weights)
        openvino_graph = build_vision_model(loaded, weights, "openvino")
    finally:
        weights.close()
    onnx.save(graph, str(root / "vision.onnx"))
    from dg_export import openvino_graphs

    openvino_graphs.convert(openvino_graph, root / "vision.xml", root / WEIGHTS_FILE)
    sessions = {"onnxruntime": OnnxRuntimeGraph(root / "vision.onnx", None),
                "openvino": OpenVinoGraph(root / "vision.xml", root / WEIGHTS_FILE, "CPU", None, "f32", None)}
    vision = config.vision_config
    return model, sessions, ImageSpec(vision.patch_size, vision.pooling_kernel_size, 70)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_image_features_equal_transformers(tower, backend):
    model, sessions, spec = tower
    for height, width in SIZES:
        image = Image.fromarray(np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8))
        values, positions = patches(image, spec)
        (features,) = sessions[backend].run(["image_features"], {"pixel_values": values[None],
                                                                 "pixel_positions": positions[None]})
        with torch.no_grad():
            expected = model.model.encoder.get_image_features(torch.from_numpy(values[None]),
                                                              torch.from_numpy(positions[None])).pooler_output.numpy()
        assert features.shape == (1, len(values) // spec.pooling_kernel ** 2, model.config.text_config.hidden_size)
        assert np.abs(expected).max() > 1.0  # features of some size: a wrong op would show
        np.testing.assert_allclose(features[0], expected, atol=2e-5, rtol=1e-4)
