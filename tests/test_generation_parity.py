"""Same noise, same tokens: the runtime on both backends against transformers' generate."""

import numpy as np
import pytest

from conftest import CONFIGS
from dg_export.reference import generate_with_noise, probability_margin
from dg_runtime import Block, DiffusionGemma, Draft, NoiseSource, Settings

# Settings chosen so that the seeds cover several blocks, EOS inside a canvas, stops on max steps, and adaptive
# stops (stability 0 with a confidence threshold that the falling temperature crosses part-way).
SCENARIOS = [
    Settings(max_new_tokens=80, max_denoising_steps=10, entropy_bound=0.5, t_max=0.3, t_min=0.1),
    Settings(max_new_tokens=64, max_denoising_steps=12, entropy_bound=1.0, t_max=0.5, t_min=0.05,
             stability_threshold=0, confidence_threshold=0.5),
    Settings(max_new_tokens=48, max_denoising_steps=6, entropy_bound=0.1, t_max=0.8, t_min=0.4),
    Settings(max_new_tokens=100, max_denoising_steps=8, entropy_bound=2.0, t_max=0.2, t_min=0.1,
             stability_threshold=2, confidence_threshold=0.05),
    Settings(max_new_tokens=40, max_denoising_steps=16, entropy_bound=0.3, t_max=0.4, t_min=0.2,
             stability_threshold=0, confidence_threshold=0.2),
]


def first_divergence(ours: list, recorder) -> str:
    """Where the runtime's drafts first differ from transformers': block, step, position, and how close
    transformers' own choice was (the probability margin between its top two tokens there)."""
    for (block, step, canvas), logits in zip(ours, recorder.logits):
        theirs = logits.argmax(-1)
        if not np.array_equal(canvas, theirs):
            row, pos = np.argwhere(canvas != theirs)[0]
            return (f"block {block}, step {step}, row {row}, position {pos}: runtime {canvas[row, pos]} vs "
                    f"transformers {theirs[row, pos]} (transformers' top-2 probability margin "
                    f"{probability_margin(logits, row, pos):.3g})")
    return f"drafts agree; step counts differ ({len(ours)} vs {len(recorder.logits)})"


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_same_noise_same_tokens(exported, hf_model, name, backend):
    checkpoint, artifact = exported(name, confident=True)
    model = hf_model(checkpoint)
    runtime = DiffusionGemma(artifact, backend=backend)
    vocab = runtime.vocab_size
    seen = {"blocks>1": 0, "eos mid-canvas": 0, "max steps": 0, "adaptive stop": 0}
    for seed in range(20):
        settings = SCENARIOS[seed % len(SCENARIOS)]
        batch = 2 if seed % 4 == 3 else 1
        prompt = np.random.default_rng(seed).integers(5, vocab, (batch, 3 + 5 * seed % 23))
        expected, recorder = generate_with_noise(model, prompt, settings, NoiseSource(seed))

        drafts, blocks = [], []
        for event in runtime.stream(prompt, settings=settings, noise=NoiseSource(seed)):
            if isinstance(event, Draft):
                drafts.append((event.block, event.step, event.canvas.copy()))
            elif isinstance(event, Block):
                blocks.append(event)
        # transformers returns whole blocks; the runtime cuts them to max_new_tokens. Every token, and the length.
        ours, want = event.tokens, expected[:, : settings.max_new_tokens]
        assert ours.shape == want.shape and np.array_equal(ours, want), (
            f"seed {seed}, {settings}: shapes {ours.shape} vs {want.shape}; {first_divergence(drafts, recorder)}")

        seen["blocks>1"] += len(blocks) > 1
        seen["eos mid-canvas"] += any(np.isin(b.tokens[:, :-1], runtime.eos_ids).any() for b in blocks)
        seen["max steps"] += any(b.steps == settings.max_denoising_steps for b in blocks)
        seen["adaptive stop"] += any(b.steps < settings.max_denoising_steps for b in blocks)
    assert all(seen.values()), seen
