"""Solves release the GIL between calls of f: other Python threads keep running, and several
threads can solve at once with correct results."""

from __future__ import annotations

import math
import threading
import time

import torch
from conftest import decay, oscillator, oscillator_exact

import diffeqlayers as dl

JOIN_TIMEOUT = 60.0


def _run_in_thread(target):
    box = {}

    def wrapper():
        try:
            box["result"] = target()
        except BaseException as e:  # handed to the main thread
            box["error"] = e

    th = threading.Thread(target=wrapper, daemon=True)
    th.start()
    return th, box


def test_solve_in_a_thread_while_the_main_thread_runs_python():
    u0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    prob = dl.ODEProblem(oscillator, u0, (0.0, 2.0))
    th, box = _run_in_thread(lambda: dl.solve(prob, "rk4", dt=2e-3))
    # Busy Python work in the main thread while the solve runs: it must make progress (the solve
    # does not hold the GIL for its whole duration) and the solve must finish.
    main_iterations = 0
    deadline = time.monotonic() + JOIN_TIMEOUT
    while th.is_alive() and time.monotonic() < deadline:
        main_iterations += 1
        sum(range(100))
    th.join(timeout=1.0)
    assert not th.is_alive(), "the solve did not finish"
    assert "error" not in box, box.get("error")
    sol = box["result"]
    assert main_iterations > 10
    assert sol.success and sol.stats.naccept == 1000
    # rk4 at h = 2e-3 over T = 2: T h^4 = 3e-11 bound.
    assert float((sol.u - oscillator_exact(u0, sol.t)).abs().max()) <= 3e-11


def test_two_threads_solving_at_once_get_their_own_results():
    rates = [0.5, 1.7]
    results = [None, None]
    errors = []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            barrier.wait(timeout=JOIN_TIMEOUT)
            prob = dl.ODEProblem(
                decay,
                torch.tensor([1.0, 2.0], dtype=torch.float64),
                (0.0, 1.0),
                torch.tensor(rates[i], dtype=torch.float64),
            )
            results[i] = dl.solve(prob, "tsit5", saveat=[0.25, 0.5, 1.0], rtol=1e-10, atol=1e-12)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=JOIN_TIMEOUT)
    assert not any(th.is_alive() for th in threads)
    assert not errors, errors
    for rate, sol in zip(rates, results):
        t = sol.t
        exact = torch.exp(-rate * t)[:, None] * torch.tensor([1.0, 2.0], dtype=torch.float64)
        assert float((sol.u - exact).abs().max()) <= 1e-9  # tsit5, rtol 1e-10, K = 10


def test_exception_in_f_inside_a_thread_propagates_there():
    def bad(u, p, t):
        if t > 0.3:
            raise ValueError("thread boom")
        return -u

    prob = dl.ODEProblem(bad, torch.tensor([1.0], dtype=torch.float64), (0.0, 1.0))
    th, box = _run_in_thread(lambda: dl.solve(prob, "rk4", dt=0.1))
    th.join(timeout=JOIN_TIMEOUT)
    assert not th.is_alive()
    assert isinstance(box.get("error"), ValueError) and "thread boom" in str(box["error"])
    # The main thread's interpreter state is unaffected.
    sol = dl.solve(dl.remake(prob, f=decay, p=1.0), "rk4", dt=0.1, saveat=[1.0])
    assert abs(sol.u[-1].item() - math.exp(-1.0)) <= 1e-5


def test_gradients_in_threads():
    def work():
        a = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        prob = dl.ODEProblem(decay, torch.tensor([1.0], dtype=torch.float64), (0.0, 1.0), a)
        out = dl.diffeq_rd(a, lambda s: s.u[-1].sum(), prob, "rk4", dt=0.01)
        (g,) = torch.autograd.grad(out, a)
        return float(g)

    pairs = [_run_in_thread(work) for _ in range(2)]
    for th, box in pairs:
        th.join(timeout=JOIN_TIMEOUT)
        assert not th.is_alive() and "error" not in box, box.get("error")
        assert abs(box["result"] - (-math.exp(-0.8))) <= 1e-9  # rk4, dt = 0.01
