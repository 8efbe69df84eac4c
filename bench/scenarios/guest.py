"""Guest side of the conformance run: the kernel's /dev/tpmrmN and cusetpm's CUSE node.

``python -m bench.scenarios.guest RWDIR [--quick]`` runs as root inside the
virtme-ng guest (bench/conformance.py boots it through tests/vm/harness). Both
systems sit on the same swtpm build, each on a fresh throw-away state:

* kernel: ``modprobe tpm_vtpm_proxy`` + ``swtpm chardev --vtpm-proxy --tpm2``;
* cusetpm-CUSE: ``swtpm socket`` + ``cusetpm serve --backend swtpm:tcp:… --name tpmrm-conf``.

Rows go to RWDIR/conformance-guest.json after each system (a timeout keeps what
was done); progress lines go to the console, which the host captures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from bench.scenarios import run_target, systems
from bench.scenarios.conn import Target

CUSE_NAME = "tpmrm-conf"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scenarios.guest")
    parser.add_argument("rwdir", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    out = args.rwdir / "conformance-guest.json"
    report: dict[str, object] = {"rows": [], "systems": {}}
    rows: list[dict[str, object]] = report["rows"]  # type: ignore[assignment]
    info: dict[str, object] = report["systems"]  # type: ignore[assignment]
    tmp = Path(tempfile.mkdtemp(prefix="cusetpm-conf-"))

    def kernel() -> AbstractContextManager[Target]:
        return systems.kernel_tpmrm(tmp / "kernel-state")

    def cusetpm() -> AbstractContextManager[Target]:
        return _cusetpm_cuse(tmp)

    plan: list[tuple[str, Callable[[], AbstractContextManager[Target]]]] = [
        ("kernel", kernel), ("cusetpm-CUSE", cusetpm)]
    status = 0
    for system, bring_up in plan:
        start = time.monotonic()
        print(f"[conformance] {system}: starting", flush=True)
        try:
            with bring_up() as target:
                up = time.monotonic() - start
                for row in run_target(target, args.quick):
                    rows.append(row)
                    print(f"[conformance] {system} {row['scenario']}: {row['status']} "
                          f"({row['seconds']} s) {row['detail']}", flush=True)
                    out.write_text(json.dumps(report, indent=1) + "\n")
            info[system] = {"node": target.node, "startup_s": round(up, 1),
                            "total_s": round(time.monotonic() - start, 1)}
        except Exception:
            status = 1
            info[system] = {"error": traceback.format_exc()[-2000:]}
            print(f"[conformance] {system} failed:\n{traceback.format_exc()}", flush=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    return status


@contextlib.contextmanager
def _cusetpm_cuse(tmp: Path) -> Iterator[Target]:
    """swtpm socket + cusetpm serve --name on it."""
    with systems.swtpm_socket(tmp / "cusetpm-swtpm-state") as port, systems.cusetpm_node(
        "cusetpm-CUSE", f"swtpm:tcp:127.0.0.1:{port}", tmp, name=CUSE_NAME
    ) as target:
        yield target


if __name__ == "__main__":
    sys.exit(main())
