"""The embedded demo models really write: they solve held-out problems under transformers and on both backends."""

import numpy as np
import pytest

from dg_export import export
from dg_export.builtin import builtin_checkpoint
from dg_export.demo import problems
from dg_export.demo.prose import KINDS
from dg_export.reference import generate_with_noise
from dg_runtime import NoiseSource, load
from dg_runtime.streamer import reply_tokens

# the held-out seed (training excluded these); canvas256's problems fill whole 256-token canvases, so fewer of them
COUNTS = {"tiny": 40, "canvas256": 12}


@pytest.fixture(scope="module", params=list(COUNTS))
def demo(request, tmp_path_factory, demo_artifact):
    """(name, artifact, held-out problems, transformers' answers, and per problem its tokens per forward and steps
    per block as transformers counts them)."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    name = request.param
    artifact = demo_artifact if name == "tiny" else export(f"builtin:{name}", tmp_path_factory.mktemp(name) / "a.dg")
    held_out = problems(name, 12345, COUNTS[name])
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(builtin_checkpoint(f"builtin:{name}"),
                                                            dtype=torch.float32).eval()
    runtime = load(artifact)
    answers, rates, steps = [], [], []
    for seed, (prompt, _, _) in enumerate(held_out):
        tokens, recorder = generate_with_noise(model, np.array([runtime.prompt_ids(prompt)]), runtime.defaults,
                                               NoiseSource(seed))
        answers.append(runtime.text.decode(reply_tokens(tokens[0], runtime.eos_ids, runtime.pad_id)))
        rates.append(int((tokens[0] != runtime.pad_id).sum()) / len(recorder.logits))
        steps.append(len(recorder.logits) * runtime.canvas_length / tokens.shape[1])
    return name, artifact, held_out, answers, rates, steps


def test_solves_held_out_problems_with_default_settings(demo):
    name, _, held_out, answers, tokens_per_forward, steps_per_block = demo
    checked = [(a, answer) for a, (_, answer, _) in zip(answers, held_out) if answer is not None]
    assert len(checked) >= 0.6 * len(held_out)
    assert np.mean([a == answer for a, answer in checked]) >= 0.9, [
        (a, answer) for a, answer in checked if a != answer][:2]
    if name == "tiny":  # two steps a block
        assert np.mean(tokens_per_forward) >= 4
    else:  # the published model's regime: tens of steps a 256-token block, not a canvas accepted at once
        checkable = [s for s, (_, answer, _) in zip(steps_per_block, held_out) if answer is not None]
        assert 10 <= np.median(checkable) <= 40, checkable


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_artifacts_answer_as_transformers_does(demo, backend):
    _, artifact, held_out, reference, _, _ = demo
    model = load(artifact, backend=backend)
    answers = [model.generate_text(prompt, seed=seed) for seed, (prompt, _, _) in enumerate(held_out)]
    assert sum(a == b for a, b in zip(answers, reference)) >= 0.95 * len(held_out)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fast_mode_still_answers_exactly(demo, backend):
    _, artifact, held_out, _, _, _ = demo
    model = load(artifact, backend=backend)
    checked = [(model.generate_text(prompt, seed=seed, fast=True), answer)
               for seed, (prompt, answer, _) in enumerate(held_out) if answer is not None]
    assert np.mean([a == answer for a, answer in checked]) >= 0.9, [(a, b) for a, b in checked if a != b][:2]


def test_problems_are_seeded_and_checkable():
    assert problems("tiny", 7, 5) == problems("tiny", 7, 5) != problems("tiny", 8, 5)
    assert {kind for _, _, kind in problems("tiny", 0, 200)} == {"upper", "next", "greet", "shout"}
    prompt, answer, kind = problems("tiny", 0, 1)[0]
    assert prompt.startswith(f"{kind}: ") and answer
    drawn = problems("canvas256", 7, 60)
    assert drawn == problems("canvas256", 7, 60) != problems("canvas256", 8, 60)
    assert {kind for _, _, kind in drawn} == set(KINDS)
    for prompt, answer, kind in drawn:
        assert (answer is None) == (kind == "continue")
        if kind == "upper":
            assert answer == prompt.removeprefix("upper: ").upper() and len(answer) == 240
    with pytest.raises(ValueError, match="the embedded models are: tiny, canvas256"):
        problems("large", 0, 1)
