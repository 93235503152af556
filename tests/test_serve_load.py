"""Load: 8 concurrent streaming clients for 60 s against a dg-serve process on the demo artifact, per backend:
no failed request, every answer equal to a serial `generate` with the same seed, server RSS growth under 5 %
(`python -m dg_serve.loadtest` prints the same table)."""

import pytest

from dg_serve.loadtest import HEADER, load_test, report


@pytest.mark.soak
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_eight_streaming_clients_for_a_minute(demo_artifact, backend):
    result = load_test(demo_artifact, backend, clients=8, seconds=60)
    row = report(result)  # in every failure's first line, which is what a test summary keeps
    print(f"\n{HEADER}\n{row}")
    assert not result["failed"], (row, result["failed"][:5])
    assert not result["different"], (row, result["different"][:5])
    assert result["requests"] >= 100, row
    assert result["rss_after_mb"] / result["rss_before_mb"] - 1 < 0.05, row
