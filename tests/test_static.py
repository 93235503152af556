"""Static shapes for NPUs (recipe `openvino.static`): the IR has no dynamic dimension, compiles on the CPU plugin as it
is, and generates the dynamic artifact's tokens with the same noise (f32), through chunked prompts, chats and fast
mode."""

import json

import numpy as np
import openvino as ov
import pytest

from conftest import openvino_pairs
from dg_export import export
from dg_runtime import Chat, Settings, UserError, load

STATIC_F32 = {"description": "static shapes in f32", "formats": ["openvino"], "weights": "fp32",
              "openvino": {"inference_precision": "f32", "moe": "tiled", "static": {"kv_capacity": 400}}}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """name -> (dynamic OpenVINO artifact, static artifact) of the demo model and a held-out config, both f32."""
    return openvino_pairs(tmp_path_factory.mktemp("static"), STATIC_F32)


@pytest.mark.parametrize("name", ["demo", "gqa-window12"])
def test_the_ir_is_static_and_compiles_as_it_is(pair, name):
    _, static = pair[name]
    model = ov.Core().read_model(str(static / "model.xml"))
    assert not model.is_dynamic()
    assert not [op.get_friendly_name() for op in model.get_ordered_ops()
                for output in op.outputs() if output.get_partial_shape().is_dynamic]
    ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    manifest = json.loads((static / "manifest.json").read_text())
    sizes = manifest["openvino"]["static"]
    assert sizes["tokens"] == manifest["model"]["canvas_length"] and sizes["past_full"] == 400
    assert all(isinstance(d, int) for e in manifest["graphs"]["model"]["inputs"] for d in e["shape"])


@pytest.mark.parametrize("name", ["demo", "gqa-window12"])
def test_static_generates_the_dynamic_artifacts_tokens(pair, name):
    dynamic, static = (load(a, backend="openvino") for a in pair[name])
    rng = np.random.default_rng(1)
    settings = Settings(max_new_tokens=40, max_denoising_steps=8)
    for seed in range(6):
        # up to 3x the static graph's tokens (the prompt goes a chunk at a time) and past the sliding window
        prompt = rng.integers(5, dynamic.vocab_size, (1, int(rng.integers(3, 3 * dynamic.canvas_length))))
        fast = settings.with_overrides(fast=seed % 2 == 1)
        expected = dynamic.generate(prompt, settings=fast, seed=seed).tokens
        assert np.array_equal(static.generate(prompt, settings=fast, seed=seed).tokens, expected), seed
    two_rows = rng.integers(5, dynamic.vocab_size, (2, 9))  # a batch runs a row at a time
    assert np.array_equal(static.generate(two_rows, settings=settings).tokens,
                          dynamic.generate(two_rows, settings=settings).tokens)


def test_a_chat_on_the_static_artifact(pair):
    dynamic, static = (load(a, backend="openvino") for a in pair["demo"])
    replies = []
    for model in (dynamic, static):
        chat = Chat(model)
        replies.append([chat.send("greet: alice", seed=1), chat.send("upper: hello", seed=2)])
    assert replies[1] == replies[0] and replies[0][0] == "hello alice, nice to meet you"


def test_the_kv_capacity_is_said(pair):
    _, static = pair["demo"]
    model = load(static, backend="openvino")
    with pytest.raises(UserError, match="positions; the model has 400"):
        model.generate_text("greet: " + "a" * 380, settings=Settings(max_new_tokens=32))


def test_static_shapes_are_openvino_only(tmp_path):
    recipe = tmp_path / "static.json"
    recipe.write_text(json.dumps(STATIC_F32))
    with pytest.raises(UserError, match="OpenVINO's only"):
        export(output=tmp_path / "a.dg", recipe=str(recipe), formats=["onnx", "openvino"])
    recipe.write_text(json.dumps({**STATIC_F32, "openvino": {**STATIC_F32["openvino"], "moe": "sorted"}}))
    with pytest.raises(UserError, match="needs formats"):
        export(output=tmp_path / "b.dg", recipe=str(recipe))
    assert not list(tmp_path.glob("*.dg"))
