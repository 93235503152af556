"""The runtime as an app gets it: a wheel built from this tree, installed with only its [onnxruntime] extra into a
clean virtual environment, generates from Python with no torch, transformers or onnx installed."""

import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

APP = """
import importlib.util, sys
import dg_runtime
model = dg_runtime.load(sys.argv[1])
print(model.generate_text("greet: alice", seed=0))
absent = [m for m in ("torch", "transformers", "onnx", "openvino") if importlib.util.find_spec(m) is not None]
assert not absent, absent
"""


def site_packages_mb(environment: Path) -> float:
    site = next(environment.glob("lib/python*/site-packages"))
    return sum(p.stat().st_size for p in site.rglob("*") if p.is_file()) / 1e6


def test_the_runtime_wheel_in_a_clean_environment(tmp_path, demo_artifact):
    source = tmp_path / "source"  # setuptools builds in the source tree: a copy keeps the checkout clean
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "*.dg"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("dg_edge-*.whl")
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    before = site_packages_mb(environment)
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              f"{wheel}[onnxruntime]"], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    print(f"\ndg-edge[onnxruntime] installed: {site_packages_mb(environment) - before:.0f} MB in site-packages")

    app = subprocess.run([str(python), "-c", APP, str(demo_artifact)], capture_output=True, text=True)
    assert app.returncode == 0, app.stderr
    assert app.stdout.strip() == "hello alice, nice to meet you"

    for command, args in (("dg-run", [str(demo_artifact), "greet: alice"]), ("dg-export", ["-o", str(tmp_path / "x")])):
        result = subprocess.run([str(environment / "bin" / command), *args], capture_output=True, text=True)
        if command == "dg-run":
            assert result.returncode == 0 and "hello alice" in result.stdout, result.stderr
        else:  # the exporter needs its extra: one line that says which, no traceback
            assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
            assert result.stderr.strip() == ("dg-export: error: exporting needs the [export] extra (torch, "
                                             "transformers, onnx, onnxscript, safetensors missing): pip install "
                                             "'dg-edge[export]'")
