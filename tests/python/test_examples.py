"""The examples run end to end (a few iterations each) and write their outputs."""

import math
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


# ----------------------------------------------------------------------------------------------
# The examples of issue 5: each one is run with a very short budget.
# ----------------------------------------------------------------------------------------------


def run_example(name: str, *args: str) -> str:
    """Runs examples/NAME with ARGS, asserts it succeeded and returns its standard output."""
    script = os.path.join(ROOT, "examples", name)
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def numbers_after(stdout: str, line_start: str, key: str) -> list[float]:
    """The number following KEY on each line of STDOUT that starts with LINE_START."""
    return [
        float(line.split(key)[1].split()[0])
        for line in stdout.splitlines()
        if line.startswith(line_start) and key in line
    ]


def assert_pngs(out, *names: str) -> None:
    for name in names:
        path = out / name
        assert path.exists() and path.stat().st_size > 10_000, f"{name} not written"


def test_lotka_volterra_fit_runs_both_modes(tmp_path):
    pytest.importorskip("matplotlib")
    stdout = run_example(
        "lotka_volterra_fit.py", "--iters", "3", "--print-every", "1", "--out", str(tmp_path)
    )
    rd = numbers_after(stdout, "[rd] iter", "loss")
    fd = numbers_after(stdout, "[fd] iter", "loss")
    assert len(rd) == len(fd) == 3
    assert all(math.isfinite(x) for x in rd + fd)
    # Adam from the seed's p = [2.2, 1.0, 2.0, 0.4] brings the loss down from ~4.3e3 at once.
    assert rd[-1] < rd[0] and fd[-1] < fd[0]
    # Both modes differentiate the same discretisation, so they follow the same path.
    assert rd == pytest.approx(fd, rel=1e-4)
    assert "[rd] final loss" in stdout and "[fd] final loss" in stdout
    assert "time per mode: rd" in stdout
    assert_pngs(tmp_path, "lv_fit_trajectory.png", "lv_fit_loss.png")


def test_neural_ode_lotka_volterra_runs(tmp_path):
    pytest.importorskip("matplotlib")
    stdout = run_example(
        "neural_ode_lotka_volterra.py", "--iters", "4", "--print-every", "2", "--out", str(tmp_path)
    )
    losses = numbers_after(stdout, "iter", "loss")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    (extrapolation,) = numbers_after(stdout, "extrapolation", "Lotka-Volterra")
    assert math.isfinite(extrapolation)
    assert "final loss over [0, 10]" in stdout
    assert_pngs(tmp_path, "node_lv_loss.png", "node_lv_fit.png", "node_lv_extrapolation.png")


def test_ode_layer_digits_learns(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    stdout = run_example("ode_layer_digits.py", "--epochs", "2", "--out", str(tmp_path))
    losses = numbers_after(stdout, "[", "loss")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    accuracies = numbers_after(stdout, "[", "test accuracy:")
    assert len(accuracies) == 2
    # Two epochs on the full training set reach ~0.9 (MLP) and ~0.8 (CNN) test accuracy with
    # the fixed seed; chance is 0.1, so 0.3 is a loose bar that only a broken model misses.
    assert all(acc > 0.3 for acc in accuracies), accuracies
    assert_pngs(tmp_path, "digits_training.png")


def test_irregular_sampling_runs(tmp_path):
    pytest.importorskip("matplotlib")
    stdout = run_example(
        "irregular_sampling.py",
        "--iters",
        "4",
        "--samples",
        "20",
        "--print-every",
        "2",
        "--out",
        str(tmp_path),
    )
    losses = numbers_after(stdout, "iter", "loss")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert "21 observations" in stdout  # t = 0 and the 20 random times
    (final,) = numbers_after(stdout, "final loss", "(vs noisy data):")
    assert math.isfinite(final)
    assert_pngs(tmp_path, "irregular_sampling.png", "irregular_sampling_loss.png")


def test_lorenz_adjoints_runs_and_reports_each_mode(tmp_path):
    pytest.importorskip("matplotlib")
    stdout = run_example(
        "lorenz_adjoints.py", "--T", "1", "--ref-rtol", "1e-11", "--out", str(tmp_path)
    )
    errors = {
        line.split(":")[0].strip(): float(line.split("relative error")[1].split()[0])
        for line in stdout.splitlines()
        if "relative error" in line
    }
    assert set(errors) == {"interpolating", "backsolve", "discrete", "rd"}
    # On [0, 1] every mode is accurate to about the (1e-8) tolerance; the discrete adjoint is
    # reverse mode's gradient to rounding.
    assert all(e < 1e-4 for e in errors.values())
    assert errors["discrete"] == pytest.approx(errors["rd"], rel=1e-3)
    assert "misses u0 by" in stdout
    assert (tmp_path / "lorenz_adjoints.md").exists()
    assert_pngs(tmp_path, "lorenz_adjoints.png")
