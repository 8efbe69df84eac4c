"""Run the benchmark sections, print Markdown tables, save JSON in bench/results/."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
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
    return str(value)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


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
    return {"section": name, "title": title, "rows": rows, "error": error,
            "seconds": round(time.monotonic() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--only", action="append", metavar="SECTION",
                        help="run only this section (e.g. backends); repeatable")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="JSON output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    names = SECTIONS
    if args.only:
        names = [n for n in SECTIONS if n.rsplit(".", 1)[-1] in args.only or n in args.only]
    results = []
    for name in names:
        result = run_section(name, args.quick)
        results.append(result)
        print(f"\n## {result['title']}\n")
        print(markdown_table(result["rows"]))
        if result["error"]:
            print(f"\nsection failed:\n```\n{result['error']}```")

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "time": stamp, "quick": args.quick, "commit": _git_commit(),
        "host": platform.node(), "python": sys.version.split()[0],
        "machine": platform.machine(), "sections": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {path}")
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
