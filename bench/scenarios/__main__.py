"""``python -m bench.scenarios --target JSON [--quick] [--only NAME] [--out FILE]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.scenarios import run_target
from bench.scenarios.conn import Target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scenarios")
    parser.add_argument("--target", required=True, help="Target as JSON (system, node, tcti, env)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="append", help="scenario name; repeatable")
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    target = Target.from_json(args.target)
    rows = run_target(target, args.quick, set(args.only) if args.only else None)
    for row in rows:
        print(f"{row['system']:14} {row['scenario']:28} {row['status']:6} {row['detail']}",
              flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
