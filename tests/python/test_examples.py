"""The examples run end to end (a few iterations each) and write their outputs."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_lotka_volterra_demo_runs_and_writes_a_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "lv.png"
    script = os.path.join(ROOT, "examples", "lotka_volterra_neural_ode.py")
    proc = subprocess.run(
        [sys.executable, script, "--iters", "6", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    losses = [
        float(line.split("loss")[1].split()[0])
        for line in proc.stdout.splitlines()
        if line.startswith("iter")
    ]
    assert len(losses) >= 2 and all(x == x for x in losses)  # printed, and not NaN
    assert "final loss" in proc.stdout
    assert out.exists() and out.stat().st_size > 10_000
