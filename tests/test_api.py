"""The embeddable API: text in and text out, typed and exported names, errors with fields, side effects opt-in."""

import inspect
import typing

import numpy as np
import pytest

import dg_runtime
from dg_runtime import ArtifactError, PromptTooLong, SettingError, Settings


@pytest.fixture(scope="module")
def model(demo_artifact):
    return dg_runtime.load(demo_artifact)


def test_text_in_text_out(model):
    assert model.generate_text("greet: alice", seed=0) == "hello alice, nice to meet you"
    ids = model.text.chat_ids([{"role": "user", "content": "upper: sunshine"}])
    tokens = model.generate([ids], seed=5).tokens[0]
    events = list(model.stream_text("upper: sunshine", seed=5))
    assert events[-1].text == model.text.decode(model.reply(tokens)) == "SUNSHINE"
    assert events[-1].finish_reason == "stop" and np.array_equal(events[-1].tokens, [tokens])
    raw = model.generate_text("upper: sunshine", raw=True, seed=5,
                              settings=model.defaults.with_overrides(max_new_tokens=8))
    assert raw == model.text.decode(model.reply(model.generate([model.text.encode("upper: sunshine")], seed=5,
                                                               settings=Settings(max_new_tokens=8)).tokens[0]))


def test_a_stop_string_ends_the_generation_at_its_block(model):
    events = list(model.stream_text("shout: " + "abcdefghijklmnopqrstuvwxyzabcdefghijklmn", seed=0, stop=["EFG"]))
    done = events[-1]
    assert done.text == "ABCD" and done.finish_reason == "stop" and done.stats.blocks == 1


def test_every_type_in_a_public_signature_is_exported():
    exported = set(dg_runtime.__all__)
    outside = ("builtins", "typing", "types", "collections.abc", "pathlib", "numpy")  # not ours to export
    for name in dg_runtime.__all__:
        item = getattr(dg_runtime, name)
        functions = [item] if inspect.isfunction(item) else [
            member for member_name, member in inspect.getmembers(item, inspect.isfunction)
            if not member_name.startswith("_") or member_name == "__init__"]
        for function in functions:
            hints = typing.get_type_hints(function)
            for where, hint in hints.items():
                for part in flatten(hint):
                    part_name = getattr(part, "__name__", str(part))
                    assert getattr(part, "__module__", "builtins") in outside or part_name in exported, (
                        f"{name}.{function.__name__}({where}): {part_name} is not exported")


def flatten(hint):
    args = typing.get_args(hint)
    return [hint] if not args else [typing.get_origin(hint), *(p for a in args for p in flatten(a))]


def test_errors_are_classes_with_fields(model):
    with pytest.raises(SettingError) as error:
        model.generate([[5, 6]], settings=Settings(entropy_bound=float("nan")))
    assert error.value.field == "entropy_bound" and np.isnan(error.value.value)
    assert str(error.value) == "entropy_bound must be a finite number (got nan)"
    assert error.value.worded({"entropy_bound": "--entropy-bound"}).startswith("--entropy-bound must")
    with pytest.raises(PromptTooLong) as error:
        model.generate([[5, 6]], settings=Settings(max_new_tokens=10**6))
    assert (error.value.prompt_tokens, error.value.max_positions) == (2, model.max_positions)
    assert "lower max_new_tokens" in str(error.value) and "--" not in str(error.value)
    with pytest.raises(ArtifactError) as error:
        dg_runtime.load(model.folder / "nope")
    assert error.value.path == model.folder / "nope"


def test_side_effects_are_opt_in(demo_artifact, tmp_path, monkeypatch):
    import shutil

    import dg_runtime.backends
    import dg_runtime.graph

    calls = []
    monkeypatch.setattr(dg_runtime.graph, "RELEASE_FROM_BYTES", 0)
    monkeypatch.setattr(dg_runtime.backends, "trim_heap", lambda: calls.append("trim") or 0)
    monkeypatch.setattr(dg_runtime.graph, "trim_heap", lambda: calls.append("trim") or 0)
    quiet = dg_runtime.load(demo_artifact)
    assert quiet.graph.weights_file is None
    quiet.generate([[5, 6, 7]], seed=0)
    assert calls == []
    upkeep = dg_runtime.load(demo_artifact, memory_upkeep=True)
    assert upkeep.graph.weights_file is not None and calls

    corrupted = tmp_path / "corrupted.dg"
    shutil.copytree(demo_artifact, corrupted)
    with open(corrupted / "model.bin", "r+b") as weights:  # same size, other bytes
        weights.seek(100)
        weights.write(b"\x7f\x7f\x7f\x7f")
    dg_runtime.load(corrupted)  # sizes are checked; the sha256 only when asked
    with pytest.raises(ArtifactError, match="sha256"):
        dg_runtime.load(corrupted, verify=True)


def test_openvino_model_cache(demo_artifact, tmp_path):
    """--cache-dir: the first start writes OpenVINO's compiled model, the next reads it, same replies."""
    first = dg_runtime.load(demo_artifact, backend="openvino", cache_dir=tmp_path / "cache")
    reply = first.generate_text("greet: alice")
    assert any((tmp_path / "cache").iterdir())
    second = dg_runtime.load(demo_artifact, backend="openvino", cache_dir=tmp_path / "cache")
    assert second.generate_text("greet: alice") == reply == "hello alice, nice to meet you"
    with pytest.raises(dg_runtime.SettingError, match="OpenVINO's model cache"):
        dg_runtime.load(demo_artifact, backend="onnxruntime", cache_dir=tmp_path / "cache")
