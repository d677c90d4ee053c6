"""Plot of the speed benchmark's tables (benchmarks/results/speed.md, written by bench_speed.py).

Three panels from the tables as written, so that the picture and the numbers are one run:

1. the foundation's neural ODE training step (section 1) and, 2., DiffEqFlux's spiral gradient
   (section 2) with diffrax's rows of section 4: time per gradient on a log scale, one bar per
   library, f and gradient mode, torchdiffeq's time marked (and for the spiral the published
   Julia figure, 1.7 ms);
3. the overhead of a solve (section 3): the share of the solve's time beyond nfe x one f call,
   with f timed in a loop as the solve calls it, grad off and on.

    python benchmarks/plot_speed.py [--md benchmarks/results/speed.md] [--out PATH.png]
"""

from __future__ import annotations

import argparse
import os

HERE = os.path.dirname(os.path.abspath(__file__))
JULIA_SPIRAL_MS = 1.7  # DiffEqFlux's published spiral gradient (one thread)


def tables(text: str) -> dict[str, list[dict[str, str]]]:
    """The markdown tables of `text` by section number ("1", "2", ...): rows as dicts."""
    out: dict[str, list[dict[str, str]]] = {}
    section = None
    header: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].split(".", 1)[0].strip()
            header = None
            continue
        if not line.startswith("|") or section is None:
            header = None if not line.strip() else header
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not all(set(c) <= set("-:") for c in cells):
            out.setdefault(section, []).append(dict(zip(header, cells)))
    return out


def gradient_rows(rows: list[dict[str, str]]) -> list[tuple[str, float]]:
    """(label, ms) for the rows of section 1 or 2."""
    return [
        (f"{r['library, f']}: {r['method']}, {r['gradient']}", float(r["time (ms)"])) for r in rows
    ]


def diffrax_rows(rows: list[dict[str, str]], case: str) -> list[tuple[str, float]]:
    """diffrax's own rows of section 4 for one case (ours are in sections 1 and 2 already)."""
    return [
        (f"{r['library']}: {r['method']}, {r['adjoint'].split(' ')[0]}", float(r["time (ms)"]))
        for r in rows
        if r["case"] == case and r["library"].startswith("diffrax")
    ]


def color(label: str) -> str:
    if label.startswith("diffeqlayers, C++ MLP"):
        return "C0"
    if label.startswith("diffeqlayers"):
        return "C9"
    if label.startswith("diffrax"):
        return "C2"
    if label.startswith("torchode"):
        return "C1"
    return "C3"  # torchdiffeq


def bars(ax, items: list[tuple[str, float]], title: str, marks: list[tuple[float, str]]) -> None:
    items = sorted(items, key=lambda x: x[1])
    y = range(len(items))
    ax.barh(list(y), [ms for _, ms in items], color=[color(lab) for lab, _ in items])
    ax.set_yticks(list(y), [lab for lab, _ in items], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("time per gradient (ms, log scale)")
    ax.set_title(title, fontsize=9)
    for ms, text in marks:
        ax.axvline(ms, color="k", linestyle="--", linewidth=0.8)
        ax.text(ms, -0.6, f" {text}", fontsize=7, va="bottom")
    for i, (_, ms) in enumerate(items):
        ax.text(ms, i, f" {ms:.2f}", va="center", fontsize=6)
    ax.set_ylim(len(items) - 0.5, -1.0)
    ax.set_xlim(right=max(ms for _, ms in items) * 2.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--md", default=os.path.join(HERE, "results", "speed.md"))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "speed.png"))
    args = parser.parse_args()
    with open(args.md) as fh:
        t = tables(fh.read())
    for needed in ("1", "2", "3"):
        if needed not in t:
            raise SystemExit(f"{args.md}: no table in section {needed} (run bench_speed.py)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8.0, 13.0), gridspec_kw={"height_ratios": [4, 4, 3]})
    train = gradient_rows(t["1"]) + diffrax_rows(t.get("4", []), "training step")
    tdq = [ms for lab, ms in train if lab.startswith("torchdiffeq")]
    bars(
        axes[0],
        train,
        "Foundation neural ODE training step (38-44 f, 101 save points), one thread",
        [(tdq[0], "torchdiffeq")] if tdq else [],
    )
    spiral = gradient_rows(t["2"]) + diffrax_rows(t.get("4", []), "spiral")
    tdq = [ms for lab, ms in spiral if lab.startswith("torchdiffeq: dopri5, reverse")]
    marks = [(JULIA_SPIRAL_MS, "DiffEqFlux (published)")]
    if tdq:
        marks.append((tdq[0], "torchdiffeq"))
    bars(axes[1], spiral, "DiffEqFlux's spiral benchmark: one gradient (tsit5)", marks)

    ax = axes[2]
    rows = t["3"]
    labels, shares = [], []
    for r in rows:
        inside = r.get("overhead, f timed inside", "-")
        share = inside if inside not in ("-", "") else r["overhead"]
        problem = r["problem"].split(" (")[0]
        labels.append(f"{problem}, {r['f']}, grad {r['grad'].split(' ')[0]}")
        shares.append(float(share.rstrip("%")))
    y = range(len(labels))
    ax.barh(list(y), shares, color=["C0" if "C++" in lab else "C9" for lab in labels])
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(10, color="k", linestyle="--", linewidth=0.8)
    ax.axvline(5, color="k", linestyle=":", linewidth=0.8)
    ax.set_xlabel("share of the solve beyond nfe x one f call (%)")
    ax.set_title(
        "Overhead of a solve (section 3; compute-bound rows: f timed inside the solve)",
        fontsize=9,
    )
    for i, s in enumerate(shares):
        ax.text(s, i, f" {s:.1f}%", va="center", fontsize=6)
    from matplotlib.patches import Patch

    legend = [
        Patch(color=color(name), label=name)
        for name in ("diffeqlayers, C++ MLP", "diffeqlayers, Python f", "diffrax", "torchode")
    ] + [Patch(color="C3", label="torchdiffeq")]
    axes[2].legend(handles=legend, fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
