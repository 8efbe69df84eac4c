"""Client-level conformance scenarios, run side by side on several resource managers.

A scenario uses only what a client has: the node's path (open/write/read/poll/
close), child processes, and tpm2-tools. Each returns an :class:`Outcome`:
``pass``/``fail`` with a short canonical ``detail`` (the same words on every
system for the same behaviour, so two systems' details can be compared), or a
``figure`` (a measurement such as "3 (4th: ENOMEM)").

``kernel_defined`` marks behaviour the kernel's /dev/tpmrm0 defines: there the
systems must agree. The other rows are where cusetpm means to do better
(limits, continuation, regap, exhaustion) and the table shows the difference.

Run one system from the command line (the guest does this)::

    python -m bench.scenarios --target '{"system": "kernel", "node": "/dev/tpmrm0",
                                         "tcti": "device:/dev/tpmrm0"}' --out rows.json
"""

from __future__ import annotations

import errno
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from bench.scenarios.conn import Target


@dataclass(frozen=True)
class Outcome:
    status: str  # pass | fail | figure | n/a
    detail: str = ""

    @classmethod
    def check(cls, ok: bool, detail: str) -> Outcome:
        return cls("pass" if ok else "fail", detail)


@dataclass(frozen=True)
class Scenario:
    name: str
    group: str
    kernel_defined: bool
    func: Callable[[Target, bool], Outcome]  # (target, quick) -> outcome
    needs_node: bool = False  # raw file semantics: only on a device node
    in_quick: bool = True
    destructive: bool = False  # clears the TPM or fills it: runs after the others
    doc: str = ""


SCENARIOS: list[Scenario] = []


def scenario(group: str, *, kernel_defined: bool, needs_node: bool = False,
             in_quick: bool = True, destructive: bool = False
             ) -> Callable[[Callable[[Target, bool], Outcome]], Callable[[Target, bool], Outcome]]:
    """Register a scenario function; its name and first docstring line describe the row."""

    def register(func: Callable[[Target, bool], Outcome]) -> Callable[[Target, bool], Outcome]:
        doc = (func.__doc__ or "").strip().splitlines()
        SCENARIOS.append(Scenario(func.__name__, group, kernel_defined, func, needs_node,
                                  in_quick, destructive, doc[0] if doc else ""))
        return func

    return register


def errname(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{type(exc).__name__}: {exc}"


def load_all() -> list[Scenario]:
    # Importing the modules registers their scenarios (in file order).
    from bench.scenarios import node, tools  # noqa: F401

    return SCENARIOS


def run_target(target: Target, quick: bool,
               only: set[str] | None = None) -> list[dict[str, object]]:
    """Every applicable scenario on one system; one row each. Never raises."""
    rows: list[dict[str, object]] = []
    scenarios = sorted(load_all(), key=lambda s: s.destructive)  # stable: file order otherwise
    for sc in scenarios:
        if only is not None and sc.name not in only:
            continue
        start = time.monotonic()
        if quick and not sc.in_quick:
            outcome = Outcome("n/a", "skipped in --quick")
        elif sc.needs_node and not target.is_node:
            outcome = Outcome("n/a", "no device node (raw file semantics)")
        else:
            try:
                outcome = sc.func(target, quick)
            except Exception as exc:  # a scenario's crash is that system's failure, not ours
                last = traceback.format_exc().strip().splitlines()[-1]
                outcome = Outcome("fail", f"exception: {errname(exc)} ({last})")
        rows.append({
            "scenario": sc.name, "group": sc.group, "kernel_defined": sc.kernel_defined,
            "system": target.system, "status": outcome.status, "detail": outcome.detail,
            "seconds": round(time.monotonic() - start, 2), "doc": sc.doc,
        })
    return rows
