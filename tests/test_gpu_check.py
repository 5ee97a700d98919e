"""benchmarks/gpu_check.sh must work the first time on a GPU: its dry run (same commands, toy
sizes, no installs) runs here on the CPU and brings back every table."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_table(tmp_path):
    out = tmp_path / "gpu"
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable})
    assert run.returncode == 0, run.stderr[-2000:]
    timings = (out / "timings.txt").read_text()
    for part in ("condense_speed", "evaluate_speed", "parity"):
        assert f"end {part} rc=0" in timings, timings
    assert timings.rstrip().endswith("done")
    condense = (out / "condense_speed.md").read_text().splitlines()
    assert any(line.startswith("| idm | 1 | ") for line in condense)
    assert any(line.startswith("| map | host |") for line in (out / "evaluate_speed.md").read_text().splitlines())
    parity = (out / "parity.md").read_text().splitlines()
    rows = [line for line in parity if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 2 and all("(pending) | —" in r and "± 0.00 (1)" in r for r in rows)  # idm_jax side scored
    assert (out / "parity.png").read_bytes()[:4] == b"\x89PNG"
