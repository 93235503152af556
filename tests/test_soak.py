"""Soak: 1,000 generations on one loaded model, on each backend, without memory growth (`pytest -m soak`).

Each soak runs in a fresh process, so that what the test suite's own process accumulated (other tests' models,
allocator arenas) does not count as the runtime's growth.
"""

import subprocess
import sys

import pytest

GENERATIONS = 1000
SOAK = """
import sys
from dg_runtime import DiffusionGemma, Settings

def rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

model = DiffusionGemma(sys.argv[1], backend=sys.argv[2])
settings = Settings(max_new_tokens=32, max_denoising_steps=8)
prompts = [model.text.chat_ids([{"role": "user", "content": f"greet: {name}"}])
           for name in ("alice", "bruno", "chloe", "david", "emily")]
for seed in range(50):  # warm-up: allocator pools and backend caches reach their size
    model.generate([prompts[seed % 5]], settings=settings, seed=seed)
before = rss_bytes()
for seed in range(int(sys.argv[3])):
    done = model.generate([prompts[seed % 5]], settings=settings, seed=seed)
    assert done.tokens.shape == (1, 32)
print(before, rss_bytes())
"""


@pytest.mark.soak
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_thousand_generations_keep_memory_flat(tmp_path_factory, backend):
    from dg_export import export

    artifact = tmp_path_factory.mktemp("soak") / "tiny.dg"
    export(output=artifact, validation=None)
    result = subprocess.run([sys.executable, "-c", SOAK, str(artifact), backend, str(GENERATIONS)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    before, after = map(int, result.stdout.split())
    growth = after / before - 1
    print(f"\n{backend}: {GENERATIONS} generations, RSS {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB ({growth:+.1%})")
    assert growth < 0.05, growth
