"""benchmarks/gpu_check.sh must work the first time on a GPU: its dry run (same commands, toy
sizes, no installs) runs here on the CPU and brings back every table."""

import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_table(tmp_path):
    out = tmp_path / "gpu"
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable})
    assert run.returncode == 0, run.stderr[-2000:]
    timings = (out / "timings.txt").read_text()
    for part in ("parity_idm_jax", "parity_eval", "parity_report", "condense_speed"):
        assert f"end {part} rc=0" in timings, timings
    assert timings.rstrip().endswith("done")
    condense = (out / "condense_speed.md").read_text().splitlines()
    assert any(line.startswith("| idm | 1 | ") for line in condense)
    parity = (out / "parity.md").read_text().splitlines()
    rows = [line for line in parity if line.startswith("| 0 |") or line.startswith("| 1 |")]
    # idm_jax's side pooled over the two condensation seeds; no release in a dry run
    assert len(rows) == 2 and all("(2 runs, 2 nets) | (pending) | —" in r for r in rows), parity
    assert (out / "parity.png").read_bytes()[:4] == b"\x89PNG"
    # At most 8 files come back from a device run: everything else is in one archive.
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "condense_speed.md", "devices.txt", "parity.md", "parity.png", "results.tar.gz", "timings.txt"]
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/parity_eval.log" in names and "parity_run/seed_1/idm_jax/snap_1.npz" in names
    assert not any("checkpoints" in n or n.endswith("data.npz") for n in names)
