"""The embedded demo model really writes: it solves held-out problems under transformers and on both backends."""

import numpy as np
import pytest

from dg_export.builtin import builtin_checkpoint
from dg_export.demo import problems
from dg_export.reference import generate_with_noise
from dg_runtime import NoiseSource, load
from dg_runtime.streamer import reply_tokens

PROBLEMS = problems("tiny", 12345, 40)  # the held-out seed: training excluded these


@pytest.fixture(scope="module")
def transformers_answers(hf_model, demo_artifact):
    model, runtime = hf_model(builtin_checkpoint()), load(demo_artifact)
    answers, rates = [], []
    for seed, (prompt, _, _) in enumerate(PROBLEMS):
        tokens, recorder = generate_with_noise(model, np.array([runtime.prompt_ids(prompt)]), runtime.defaults,
                                               NoiseSource(seed))
        answers.append(runtime.text.decode(reply_tokens(tokens[0], runtime.eos_ids, runtime.pad_id)))
        rates.append(int((tokens[0] != runtime.pad_id).sum()) / len(recorder.logits))  # as transformers counts
    return answers, float(np.mean(rates))


def test_solves_held_out_problems_with_default_settings(transformers_answers):
    answers, tokens_per_forward = transformers_answers
    assert np.mean([a == answer for a, (_, answer, _) in zip(answers, PROBLEMS)]) >= 0.9
    assert tokens_per_forward >= 4


def test_problems_are_seeded_and_checkable():
    assert problems("tiny", 7, 5) == problems("tiny", 7, 5) != problems("tiny", 8, 5)
    assert {kind for _, _, kind in problems("tiny", 0, 200)} == {"upper", "next", "greet", "shout"}
    prompt, answer, kind = problems("tiny", 0, 1)[0]
    assert prompt.startswith(f"{kind}: ") and answer


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_artifacts_answer_as_transformers_does(demo_artifact, transformers_answers, backend):
    model = load(demo_artifact, backend=backend)
    answers = [model.generate_text(prompt, seed=seed) for seed, (prompt, _, _) in enumerate(PROBLEMS)]
    reference, _ = transformers_answers
    assert sum(a == b for a, b in zip(answers, reference)) >= 0.95 * len(PROBLEMS)
