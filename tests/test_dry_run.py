"""--dry-run plans the real 26B shape from its config alone: fast, small, and with the real parameter counts."""

import resource
import subprocess
import sys
import time
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "diffusiongemma-26b-a4b-it"


def test_dry_run_plans_the_26b_model():
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dg_export.cli", str(FIXTURE), "--dry-run"],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # kilobytes on Linux
    assert result.returncode == 0, result.stderr
    assert "25.25 B unique (22.84 B in experts, 0.74 B tied embedding), 3.84 B active per token" in result.stdout
    assert "canvas_ids" in result.stdout and "past.{0..29}.{key,value}" in result.stdout
    assert seconds < 30 and peak_gb < 2, (seconds, peak_gb)
