"""The embedded demo model really writes: it solves held-out problems under transformers and on both backends."""

import pytest

from dg_export.builtin import builtin_checkpoint
from dg_export.demo.evaluate import evaluate_artifact, evaluate_transformers
from dg_export.demo.tasks import held_out
from dg_runtime.text import TextCodec

PROBLEMS = held_out(40)


@pytest.fixture(scope="module")
def transformers_result():
    checkpoint = builtin_checkpoint()
    return evaluate_transformers(checkpoint, PROBLEMS, TextCodec(checkpoint))


def test_solves_held_out_problems_with_default_settings(transformers_result):
    result, _ = transformers_result
    assert result["accuracy"] >= 0.9, result
    assert result["tokens_per_forward"] >= 4, result


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_artifacts_score_like_transformers(demo_artifact, transformers_result, backend):
    result, answers = evaluate_artifact(demo_artifact, backend, PROBLEMS)
    expected, reference_answers = transformers_result
    assert abs(result["accuracy"] - expected["accuracy"]) <= 0.01, (result, expected)
    assert sum(a == b for a, b in zip(answers, reference_answers)) >= 0.95 * len(PROBLEMS)
