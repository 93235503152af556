"""Bad input: one clear line, a non-zero exit, no traceback, and nothing half-written."""

import errno
import json
import shutil

import pytest

from conftest import make_checkpoint
from dg_export import cli as export_cli
from dg_export.pipeline import OWNER_FILE
import dg_runtime.cli
from dg_runtime.cli import main as dg_run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", "window8-top2")


def one_error_line(capsys, prefix):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"{prefix}: error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def leftovers(folder):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or p.name.endswith(".old")]


def test_missing_folder(tmp_path, capsys):
    assert export_cli.main([str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 2
    assert "does not exist" in one_error_line(capsys, "dg-export")


def test_no_config(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    assert export_cli.main([str(tmp_path / "model"), "-o", str(tmp_path / "out")]) == 2
    assert "no config.json" in one_error_line(capsys, "dg-export")


def test_wrong_model_type(tmp_path, capsys, checkpoint):
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gemma3"}))
    assert export_cli.main([str(model), "-o", str(tmp_path / "out")]) == 2
    assert "model_type 'gemma3'" in one_error_line(capsys, "dg-export")


def test_missing_tokenizer(tmp_path, capsys, checkpoint):
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    (model / "tokenizer.json").unlink()
    assert export_cli.main([str(model), "-o", str(tmp_path / "out")]) == 2
    assert "tokenizer" in one_error_line(capsys, "dg-export")
    assert not (tmp_path / "out").exists()


def test_pickled_weights_refused(tmp_path, capsys, checkpoint):
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    for weights in model.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    assert export_cli.main([str(model), "-o", str(tmp_path / "out")]) == 2
    assert "safetensors only" in one_error_line(capsys, "dg-export")


def test_existing_output_needs_overwrite(tmp_path, capsys, checkpoint):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert export_cli.main([str(checkpoint), "-o", str(tmp_path / "out")]) == 2
    assert "--overwrite" in one_error_line(capsys, "dg-export")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("failure, code, message", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (OSError(errno.ENOSPC, "No space left on device"), 1, "disk is full"),
])
def test_interrupted_or_full_disk_leaves_nothing(tmp_path, capsys, checkpoint, monkeypatch, failure, code, message):
    """The failure strikes while weights stream (the tenth tensor)."""
    from dg_export.checkpoint import Checkpoint

    read, calls = Checkpoint.read, []

    def fail_midway(self, name, *rows):
        calls.append(name)
        if len(calls) == 10:
            raise failure
        return read(self, name, *rows)

    monkeypatch.setattr(Checkpoint, "read", fail_midway)
    assert export_cli.main([str(checkpoint), "-o", str(tmp_path / "out")]) == code
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


@pytest.fixture
def artifact_copy(exported, tmp_path):
    _, artifact = exported("window8-top2")
    copy = tmp_path / "artifact.dg"
    shutil.copytree(artifact, copy)
    return copy


def edit_manifest(artifact, change):
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, expected", [
    (lambda a: (a / "model.onnx").unlink(), "missing"),
    (lambda a: (a / "manifest.json").unlink(), "no manifest.json"),
    (lambda a: edit_manifest(a, lambda m: m.update(format_version=99)), "format version 99"),
    (lambda a: edit_manifest(a, lambda m: m["graphs"]["model"]["inputs"].pop()), "inputs"),
])
def test_broken_artifact(artifact_copy, capsys, damage, expected):
    damage(artifact_copy)
    assert dg_run([str(artifact_copy), "hello"]) == 2
    assert expected in one_error_line(capsys, "dg-run")


def test_corrupted_weights(artifact_copy, capsys):
    weights = artifact_copy / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert dg_run([str(artifact_copy), "hello"]) == 2
    assert "sha256" in one_error_line(capsys, "dg-run")


@pytest.mark.parametrize("args, expected", [
    (["--max-new-tokens", "0"], "-n/--max-new-tokens must be at least 1"),
    (["--max-new-tokens", "100000"], "positions"),
    (["--backend", "tensorrt"], "--backend must be one of onnxruntime, openvino (got 'tensorrt')"),
    (["--backend", "openvino", "--device", "NPU"], "OpenVINO device NPU is not available here; OpenVINO sees: CPU"),
    (["--backend", "openvino", "--device", "AUTO:GPU,CPU"], "OpenVINO device GPU is not available here"),
])
def test_bad_run_options(exported, capsys, args, expected):
    _, artifact = exported("window8-top2")
    assert dg_run([str(artifact), "hello", *args]) == 2
    assert expected in one_error_line(capsys, "dg-run")


class GpuOnlyCore:
    """What OpenVINO's Core answers on a machine with one iGPU (whose plugin has a precision hint, no thread count)."""
    available_devices = ["CPU", "GPU"]

    @staticmethod
    def get_property(device, name):
        assert name == "SUPPORTED_PROPERTIES"
        return ["INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT"] + (["INFERENCE_NUM_THREADS"] if device == "CPU" else [])


def test_device_options_go_where_they_are_taken_and_are_refused_where_not():
    from dg_runtime.backends import openvino_config
    from dg_runtime.errors import SettingError

    assert openvino_config(GpuOnlyCore, "GPU", None, "f32", None) == {"INFERENCE_PRECISION_HINT": "f32"}
    with pytest.raises(SettingError, match="threads is not an option of OpenVINO's GPU device") as refused:
        openvino_config(GpuOnlyCore, "GPU", None, "f32", 2)
    assert refused.value.worded(dg_runtime.cli.FLAGS).endswith("leave -t/--threads out, or choose --device CPU")
    assert openvino_config(GpuOnlyCore, "AUTO", None, "f32", 2) == {"DEVICE_PROPERTIES": {
        "CPU": {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2},
        "GPU": {"INFERENCE_PRECISION_HINT": "f32"}}}
    with pytest.raises(SettingError, match="threads is not an option of OpenVINO's AUTO:GPU device"):
        openvino_config(GpuOnlyCore, "AUTO:GPU", None, "f32", 2)


def test_artifact_too_large_for_memory_is_refused_before_loading(exported, capsys, monkeypatch):
    import dg_runtime.backends

    _, artifact = exported("window8-top2")
    monkeypatch.setattr(dg_runtime.backends, "available_memory", lambda: 200_000_000)
    assert dg_run([str(artifact), "hello"]) == 2
    line = one_error_line(capsys, "dg-run")
    assert "needs about 0.3 GB of memory on onnxruntime" in line and "0.2 GB are available" in line


def test_bad_prompts(exported, capsys, tmp_path):
    _, artifact = exported("window8-top2")
    assert dg_run([str(artifact), "   "]) == 2
    assert "empty" in one_error_line(capsys, "dg-run")
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"caf\xe9\n")
    assert dg_run([str(artifact), "--prompt-file", str(bad)]) == 2
    assert "not valid UTF-8" in one_error_line(capsys, "dg-run")
    assert dg_run([str(artifact)]) == 2
    assert "no prompt" in one_error_line(capsys, "dg-run")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from conftest import BASE, CONFIGS
    from dg_export.builtin import tiny_config
    from dg_export.synthetic import write_checkpoint

    overrides, canvas = CONFIGS["window8-top2"]
    config = tiny_config({**BASE, **overrides, "num_hidden_layers": len(overrides["layer_types"])}, canvas)
    return write_checkpoint(tmp_path_factory.mktemp("sharded") / "model", config, shard_bytes=32 << 10)


def break_index(model):
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.decoder.layers.0.mlp.up_proj.weight.extra"] = next(iter(index["weight_map"].values()))
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def corrupt_header(model):
    shard = sorted(model.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[10:20] = b"\xff" * 10
    shard.write_bytes(bytes(data))


def wrong_shape(model):
    """A checkpoint whose up_proj is one row short of what config.json says."""
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 1
    (model / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("damage, expected", [
    (lambda m: sorted(m.glob("*.safetensors"))[2].unlink(), "is missing"),
    (break_index, "no shard holds"),
    (corrupt_header, "JSON header is corrupt"),
    (lambda m: sorted(m.glob("*.safetensors"))[-1].write_bytes(b"\x01\x00"), "not a valid safetensors file"),
    (wrong_shape, "do not match config.json"),
])
def test_broken_sharded_checkpoint(tmp_path, capsys, sharded, damage, expected):
    model = tmp_path / "model"
    shutil.copytree(sharded, model)
    damage(model)
    assert export_cli.main([str(model), "-o", str(tmp_path / "out")]) == 2
    assert expected in one_error_line(capsys, "dg-export")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_sigterm_mid_export_leaves_nothing(tmp_path, sharded):
    """SIGTERM (what `timeout` and service managers send) while weights stream: exit 143, no staging folder."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out.dg"
    process = subprocess.Popen([sys.executable, "-m", "dg_export.cli", str(sharded), "-o", str(out)],
                               stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # wait until the export is under way
        if "building graphs" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_stale_staging_of_a_killed_export_is_removed(tmp_path, capsys, checkpoint):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".out.partial-killed"
    stale.mkdir()
    (stale / OWNER_FILE).write_text(dead.stdout.strip())
    (stale / "model.bin").write_bytes(b"\0" * 1024)
    assert export_cli.main([str(checkpoint), "-o", str(tmp_path / "out"), "--no-validate"]) == 0
    assert "removed .out.partial-killed" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("args, expected", [
    (["--threads", "-3"], "threads must be at least 1"),
    (["-t", "0"], "threads must be at least 1"),
    (["--seed", "-1"], "seed must be a whole number of 0 or more"),
    (["--confidence-threshold", "-1"], "--confidence-threshold must be 0 or more"),
    (["--entropy-bound", "nan"], "--entropy-bound must be a finite number"),
    (["--t-max", "inf"], "--t-max must be a finite number"),
    (["--t-min", "0.9"], "--t-min < --t-max"),
    (["--stability-threshold", "-2"], "--stability-threshold must be 0 or more"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["-p", "again"], "give the prompt once"),
])
def test_bad_settings_and_options(exported, capsys, backend, args, expected):
    _, artifact = exported("window8-top2")
    assert dg_run([str(artifact), "hello", "--backend", backend, *args]) == 2
    assert expected in one_error_line(capsys, "dg-run")


def test_option_for_another_backend_is_refused(exported, capsys):
    _, artifact = exported("window8-top2")
    assert dg_run([str(artifact), "hello", "--backend", "onnxruntime", "--precision", "f16"]) == 2
    assert "leave --precision out, or choose --backend openvino" in one_error_line(capsys, "dg-run")


def test_the_api_shares_the_checks(exported):
    from dg_runtime import DiffusionGemma, Settings, UserError

    _, artifact = exported("window8-top2")
    with pytest.raises(UserError, match="threads"):
        DiffusionGemma(artifact, threads=-1)
    model = DiffusionGemma(artifact)
    with pytest.raises(UserError, match="entropy_bound"):
        model.generate([[5, 6]], settings=Settings(entropy_bound=float("nan")))
    with pytest.raises(UserError, match="seed"):
        model.generate([[5, 6]], settings=Settings(max_new_tokens=4), seed=-5)


def test_prompt_after_options_and_short_flags(exported, capsys):
    _, artifact = exported("window8-top2")
    assert dg_run([str(artifact), "--raw", "-n", "4", "-s", "1", "-t", "1", "--json", "the prompt"]) == 0
    assert dg_run([str(artifact), "-p", "the prompt", "-n", "4"]) == 0
    with pytest.raises(SystemExit) as exit_info:  # no abbreviations: --prom is neither --prompt nor --prompt-file
        dg_run([str(artifact), "--prom", "x"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --prom" in capsys.readouterr().err


@pytest.mark.parametrize("change, expected", [
    (lambda m: m["model"].update(canvas_length="32"), "manifest.model.canvas_length should be int"),
    (lambda m: m["formats"]["onnx"].pop("weights"), "manifest.formats.onnx.weights is missing"),
    (lambda m: m["model"].update(kv_layout=[{"type": "sliding_attention"}]), "kv_layout[0].kv_heads is missing"),
    (lambda m: m.update(files=[]), "manifest.files should be an object"),
])
def test_manifest_of_the_wrong_shape(artifact_copy, capsys, change, expected):
    edit_manifest(artifact_copy, change)
    assert dg_run([str(artifact_copy), "hello"]) == 2
    assert expected in one_error_line(capsys, "dg-run")


def test_versions(capsys):
    for main in (dg_run, export_cli.main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--version"])
        assert exit_info.value.code == 0
    assert capsys.readouterr().out.split() == ["dg-run", "0.1.0", "dg-export", "0.1.0"]


def test_a_folder_as_prompt_file(exported, tmp_path, capsys):
    _, artifact = exported("window8-top2")
    assert dg_run([str(artifact), "-f", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys, "dg-run")


def test_an_output_path_through_a_file(checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert export_cli.main([str(checkpoint), "-o", str(tmp_path / "file" / "sub.dg")]) == 2
    assert "is a file" in one_error_line(capsys, "dg-export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_int4_keeps_a_width_no_group_divides_at_int8(tmp_path, capsys):
    """An expert width of 40: no int4 group of at least 16 divides it. The down projections stay int8 (the backup
    precision, as NNCF keeps such a tensor), the export says so, and the artifact runs on both backends."""
    from dg_export import export
    from dg_export.builtin import build_checkpoint
    from dg_runtime import load

    folder = build_checkpoint(tmp_path / "model", {"moe_intermediate_size": 40, "num_hidden_layers": 2,
                                                   "layer_types": ["sliding_attention", "full_attention"]},
                              canvas_length=32)
    export(folder, tmp_path / "int4.dg", recipe="cpu-int4-mixed", validation="by-layer")
    assert "2 tensor(s) kept at int8, the backup precision" in capsys.readouterr().err
    tensors = json.loads((tmp_path / "int4.dg" / "manifest.json").read_text())["weights"]["tensors"]
    assert {name: t["format"] for name, t in tensors.items() if "experts" in name} == {
        f"model.decoder.layers.{i}.experts.{p}": f for i in (0, 1)
        for p, f in (("gate_up_proj", "int4"), ("down_proj", "int8"))}
    for backend in ("onnxruntime", "openvino"):
        assert load(tmp_path / "int4.dg", backend=backend).generate([[5, 6, 7]], seed=0).tokens.shape == (1, 32)
