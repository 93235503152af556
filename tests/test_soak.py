"""Soak: 1,000 generations on one loaded model, on each backend, without memory growth (`pytest -m soak`)."""

import pytest

from dg_runtime import DiffusionGemma, Settings

GENERATIONS = 1000


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.soak
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_thousand_generations_keep_memory_flat(tmp_path_factory, backend):
    from dg_export.cli import main as dg_export

    artifact = tmp_path_factory.mktemp("soak") / "tiny.dg"
    assert dg_export(["-o", str(artifact), "--no-validate"]) == 0
    model = DiffusionGemma(artifact, backend)
    settings = Settings(max_new_tokens=32, max_denoising_steps=8)
    prompts = [model.text.chat_ids([{"role": "user", "content": f"greet: {name}"}])
               for name in ("alice", "bruno", "chloe", "david", "emily")]
    for seed in range(50):  # warm-up: allocator pools and backend caches reach their size
        model.generate([prompts[seed % 5]], settings, seed=seed)
    before = rss_bytes()
    for seed in range(GENERATIONS):
        done = model.generate([prompts[seed % 5]], settings, seed=seed)
        assert done.tokens.shape == (1, 32)
    growth = rss_bytes() / before - 1
    print(f"\n{backend}: {GENERATIONS} generations, RSS {before / 1e6:.0f} MB -> {rss_bytes() / 1e6:.0f} MB "
          f"({growth:+.1%})")
    assert growth < 0.05, growth
