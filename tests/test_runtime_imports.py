"""The runtime must import and generate with neither torch nor transformers."""

import subprocess
import sys

import pytest

SCRIPT = """
import sys
from dg_runtime import DiffusionGemma
model = DiffusionGemma(sys.argv[1], backend=sys.argv[2])
done = model.generate([model.text.encode("hello")], settings=model.defaults.with_overrides(max_new_tokens=8, max_denoising_steps=2))
assert done.tokens.shape == (1, 8), done.tokens.shape
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_runtime_runs_without_torch(exported, backend):
    _, artifact = exported("window8-top2")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(artifact), backend], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
