"""The KV cache as OpenVINO state (recipe `openvino.kv_state`): the IR reads and writes its past through variables,
and generates the stateless artifact's tokens with the same noise (f32): long prompts past the sliding window,
batches, chats, two conversations interleaved, dg-serve's prefix cache; denoising steps move no KV."""

import json

import numpy as np
import openvino as ov
import pytest
from openai import OpenAI

from conftest import openvino_pairs, serving
from dg_export import export
from dg_runtime import Chat, Settings, UserError, load
from dg_runtime.kv_state import KVState

STATE_F32 = {"description": "the KV cache as state, f32", "formats": ["openvino"], "weights": "fp32",
             "openvino": {"inference_precision": "f32", "kv_state": True}}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """name -> (stateless OpenVINO artifact, the same with its KV in state) of the demo model and a held-out config."""
    return openvino_pairs(tmp_path_factory.mktemp("kv-state"), STATE_F32)


def test_the_ir_keeps_its_past_in_variables(pair):
    _, stateful = pair["demo"]
    model = ov.Core().read_model(str(stateful / "model.xml"))
    layers = len(json.loads((stateful / "manifest.json").read_text())["model"]["kv_layout"])
    assert not [p for p in model.inputs if p.any_name.startswith("past.")]
    assert sorted(op.get_type_name() for op in model.get_ops() if op.get_type_name() in ("ReadValue", "Assign")) == \
        ["Assign"] * 2 * layers + ["ReadValue"] * 2 * layers
    request = ov.Core().compile_model(model, "CPU").create_infer_request()
    assert sorted(s.name for s in request.query_state()) == sorted(f"past.{i}.{p}" for i in range(layers)
                                                                   for p in ("key", "value"))


@pytest.mark.parametrize("name", ["demo", "gqa-window12"])
def test_state_generates_the_stateless_artifacts_tokens(pair, name):
    stateless, stateful = (load(a, backend="openvino") for a in pair[name])
    assert isinstance(stateful.graph.session, KVState)
    rng = np.random.default_rng(2)
    settings = Settings(max_new_tokens=3 * stateless.canvas_length, max_denoising_steps=8)
    for seed in range(6):
        # several prompt chunks and blocks, past the sliding window
        prompt = rng.integers(5, stateless.vocab_size, (1, int(rng.integers(3, 3 * stateless.canvas_length))))
        expected = stateless.generate(prompt, settings=settings, seed=seed).tokens
        assert np.array_equal(stateful.generate(prompt, settings=settings, seed=seed).tokens, expected), seed
    two_rows = rng.integers(5, stateless.vocab_size, (2, 9))
    assert np.array_equal(stateful.generate(two_rows, settings=settings).tokens,
                          stateless.generate(two_rows, settings=settings).tokens)


def test_denoising_moves_no_kv(pair):
    model = load(pair["demo"][1], backend="openvino")
    cache = model.new_cache(1)
    model.generate([[5] * 40], settings=Settings(max_new_tokens=2 * model.canvas_length), cache=cache)
    assert cache.length == 40 + model.canvas_length and model.graph.session.moved_bytes == 0  # two blocks
    cache.copy()  # a snapshot is read out once
    assert model.graph.session.moved_bytes == cache.nbytes > 0


def test_interleaved_chats_keep_their_own_state(pair):
    stateless, stateful = (load(a, backend="openvino") for a in pair["demo"])
    turns = [("greet: alice", "upper: hello", "greet: bob"), ("next: abcd", "shout: abc", "upper: xyz")]

    def replies(model, interleaved):
        chats = [Chat(model), Chat(model)]
        order = [(c, t) for t in range(3) for c in range(2)] if interleaved else [(c, t) for c in range(2) for t in range(3)]
        said = {}
        for c, t in order:
            said[c, t] = chats[c].send(turns[c][t], seed=t)
        return said

    expected = replies(stateless, interleaved=False)
    assert replies(stateful, interleaved=True) == expected
    assert expected[0, 0] == "hello alice, nice to meet you"


def test_an_unfinished_turn_leaves_the_conversation_as_it_was(pair):
    stateless, stateful = (load(a, backend="openvino") for a in pair["demo"])
    expected = Chat(stateless)
    expected.send("greet: alice", seed=1)
    chat = Chat(stateful)
    chat.send("greet: alice", seed=1)
    for _ in chat.stream("upper: abandoned", seed=5):
        break  # the turn's encode ran, its state is not the conversation's
    assert chat.send("upper: hello", seed=2) == expected.send("upper: hello", seed=2)


def test_the_prefix_cache_serves_from_state(pair):
    stateless, stateful = (load(a, backend="openvino") for a in pair["demo"])
    messages = [[{"role": "user", "content": "greet: alice"}],
                [{"role": "user", "content": "greet: alice"}, {"role": "assistant", "content": "hello alice, nice to "
                                                                                                "meet you"},
                 {"role": "user", "content": "upper: hello"}]]
    answers = []
    for model in (stateless, stateful):
        with serving(model) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="unused")
            answers.append([client.chat.completions.create(model="demo", messages=m, seed=3).choices[0].message.content
                            for m in (*messages, *messages)])
    assert answers[1] == answers[0]


def test_fast_mode_is_refused_with_state(pair):
    model = load(pair["demo"][1], backend="openvino")
    with pytest.raises(UserError, match="OpenVINO's state"):
        model.generate_text("greet: alice", fast=True)


def test_kv_state_and_static_shapes_exclude_each_other(tmp_path):
    recipe = tmp_path / "both.json"
    recipe.write_text(json.dumps({**STATE_F32, "openvino": {**STATE_F32["openvino"], "moe": "tiled", "static": {}}}))
    with pytest.raises(UserError, match="false with openvino.static"):
        export(output=tmp_path / "a.dg", recipe=str(recipe))
    assert not list(tmp_path.glob("*.dg"))
