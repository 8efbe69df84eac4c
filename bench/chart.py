"""The throughput chart: commands/s per workload per system, grouped bars, log scale.

Drawn from the rows of bench.compare (host systems) and bench.guest_bench (guest: kernel
/dev/tpmrm0 vs. the cusetpm CUSE node). The guest runs under TCG emulation, far slower than
the host, so it gets a panel of its own: compare bars only within a panel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.workloads import COMPARE_WORKLOADS

SHORT = {w.name: w.short for w in COMPARE_WORKLOADS}


def _series(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(workloads in order, system -> workload -> cmds/s) for the rows that have a rate."""
    workloads: list[str] = []
    systems: dict[str, dict[str, float]] = {}
    for row in rows:
        rate = row.get("cmds/s")
        if not isinstance(rate, int | float) or rate <= 0:
            continue
        if row["workload"] not in workloads:
            workloads.append(row["workload"])
        systems.setdefault(row["system"], {})[row["workload"]] = float(rate)
    return workloads, systems


def _panel(ax: Any, title: str, rows: list[dict[str, Any]]) -> None:
    workloads, systems = _series(rows)
    width = 0.8 / max(len(systems), 1)
    for i, (system, rates) in enumerate(systems.items()):
        xs = [w + (i - (len(systems) - 1) / 2) * width for w in range(len(workloads))]
        ys = [rates.get(name, 0.0) for name in workloads]
        bars = ax.bar(xs, ys, width, label=system)
        for bar, y in zip(bars, ys, strict=True):
            if y > 0:
                ax.annotate(f"{y:,.0f}", (bar.get_x() + bar.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=6, rotation=90,
                            xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([SHORT.get(name, name) for name in workloads], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("commands/s (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high * 4)  # room for the labels and the legend


def draw(host_rows: list[dict[str, Any]], guest_rows: list[dict[str, Any]],
         path: Path, subtitle: str) -> Path | None:
    """Write the PNG; None if matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [(title, rows) for title, rows in (
        ("Host, one swtpm: throughput per workload and system", host_rows),
        ("Guest kernel (qemu TCG, slow: compare only within this panel), swtpm", guest_rows),
    ) if _series(rows)[0]]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 4.8 * len(panels)), squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], panels, strict=True):
        _panel(ax, title, rows)
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
