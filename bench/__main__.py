"""Run the benchmark sections; write Markdown, JSON and the chart in bench/results/.

bench/results/latest.md (every table, with the date and the machine), latest.json,
throughput.png, and a timestamped JSON per run (not committed).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import SECTIONS

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine() -> dict[str, Any]:
    """What the numbers were taken on: they mean little without it."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": memory,
            "kernel": platform.release(), "python": sys.version.split()[0],
            "host": platform.node(), "machine": platform.machine()}


def run_section(name: str, quick: bool) -> dict[str, Any]:
    module = importlib.import_module(name)
    title = getattr(module, "TITLE", name)
    start = time.monotonic()
    try:
        rows = module.run(quick)
        error = None
    except Exception:
        # One broken section must not hide the others' numbers.
        rows, error = [], traceback.format_exc()
    return {"section": name, "title": title, "notes": getattr(module, "NOTES", ""),
            "rows": rows, "error": error, "seconds": round(time.monotonic() - start, 2),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _git_commit()}


def _section_markdown(result: dict[str, Any]) -> str:
    parts = [f"## {result['title']}", "", markdown_table(result["rows"])]
    if result.get("notes"):
        parts += ["", result["notes"].rstrip()]
    if result["error"]:
        parts += ["", f"section failed:\n```\n{result['error']}```"]
    when = f", run {result['date']}, commit {result['commit']}" if result.get("date") else ""
    parts += ["", f"_{result['section']}: {result['seconds']:.1f} s{when}_"]
    return "\n".join(parts)


def report_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    head = [
        f"# cusetpm benchmarks{' (--quick)' if report['quick'] else ''}",
        "",
        f"- date: {report['date']} (commit {report['commit']})",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, kernel {m['kernel']}, "
        f"Python {m['python']}",
        f"- total: {report['seconds']:.0f} s",
        "",
        "Benchmarks report; they do not assert. Ratios are taken within one run.",
    ]
    if report.get("chart"):
        head += ["", f"![throughput]({Path(report['chart']).name})"]
    return "\n".join(head + [""] + [_section_markdown(r) + "\n" for r in report["sections"]])


def _own_reports(report: dict[str, Any], out: Path) -> list[Path]:
    """Sections naming a RESULTS_FILE (e.g. roundtrip/latest.md) also get a file of their own,
    with the date and machine. A run of some of a file's sections replaces those and keeps
    the others from their last run (a JSON next to the file holds them); each section says
    when it ran."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in report["sections"]:
        name = getattr(importlib.import_module(result["section"]), "RESULTS_FILE", None)
        if name:
            groups.setdefault(name, []).append(result)
    written = []
    for name, results in groups.items():
        path = out / name
        if report["quick"]:
            path = path.with_name(f"{path.stem}-quick{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = path.with_suffix(".json")
        merged = {r["section"]: r for r in _load_sections(kept)}
        for result in results:
            old = merged.get(result["section"])
            if result["error"] and not result["rows"] and old and old.get("rows"):
                # A broken run (a qemu crash) must not wipe the last good table: keep it, say so.
                why = result["error"].strip().splitlines()[-1]
                old = {**old, "notes": old.get("notes", "") +
                       f"\n- a later run ({result['date']}) failed: {why}\n"}
                merged[result["section"]] = old
            else:
                merged[result["section"]] = result
        order = {name: i for i, name in enumerate(SECTIONS)}
        sections = sorted(merged.values(), key=lambda r: order.get(r["section"], len(order)))
        kept.write_text(json.dumps({**report, "sections": sections}, indent=2) + "\n")
        path.write_text(report_markdown({**report, "sections": sections, "chart": None}))
        written.append(path)
    return written


def _load_sections(path: Path) -> list[dict[str, Any]]:
    try:
        sections: list[dict[str, Any]] = json.loads(path.read_text())["sections"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return sections


def _chart(results: list[dict[str, Any]], out: Path, subtitle: str) -> str | None:
    from bench.chart import draw

    def rows_of(section: str) -> list[dict[str, Any]]:
        return next((r["rows"] for r in results if r["section"] == section), [])

    try:
        path = draw(rows_of("bench.compare"), rows_of("bench.guest_bench"),
                    out / "throughput.png", subtitle)
    except Exception:
        traceback.print_exc()
        return None
    return str(path) if path else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="short runs, no guest boot (a smoke test, under a minute)")
    parser.add_argument("--only", action="append", metavar="SECTION",
                        help="run only this section (e.g. compare); repeatable")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output directory")
    parser.add_argument("--tpm-delay-ms", type=float, metavar="MS",
                        help="the slow-TPM sections' delay per TPM command (default 3)")
    args = parser.parse_args(argv)
    if args.tpm_delay_ms is not None:
        os.environ["CUSETPM_BENCH_TPM_DELAY_MS"] = str(args.tpm_delay_ms)
    logging.basicConfig(level=logging.WARNING)

    names = SECTIONS
    if args.only:
        names = [n for n in SECTIONS if n.rsplit(".", 1)[-1] in args.only or n in args.only]
    started = time.monotonic()
    now = datetime.datetime.now(datetime.UTC)
    results = []
    for name in names:
        result = run_section(name, args.quick)
        results.append(result)
        print("\n" + _section_markdown(result), flush=True)

    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    report: dict[str, Any] = {
        "time": stamp, "date": now.strftime("%Y-%m-%d %H:%M UTC"), "quick": args.quick,
        "commit": _git_commit(), "machine": machine(), "sections": results,
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    m = report["machine"]
    report["chart"] = None
    if not args.only:  # a partial run leaves the full run's latest.* and chart alone
        report["chart"] = _chart(results, args.out, f"{report['date']}, commit "
                                 f"{report['commit']}, {m['cpu']}, {m['cores']} cores, "
                                 f"kernel {m['kernel']}")
    text = json.dumps(report, indent=2) + "\n"
    path = args.out / f"bench-{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(text)
    written = [path, *_own_reports(report, args.out)]
    if not args.only:
        (args.out / "latest.json").write_text(text)
        (args.out / "latest.md").write_text(report_markdown(report))
        written.insert(0, args.out / "latest.md")
    print("\nresults: " + ", ".join(str(p) for p in written)
          + (f", {report['chart']}" if report["chart"] else "")
          + f" ({report['seconds']:.0f} s)")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
