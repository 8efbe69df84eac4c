"""The control socket: `cusetpm status` connects, reads one JSON document, and is done.

Served on a thread of its own; it reads the RM's counters (rm/status.py) and never queues
behind a TPM command. The socket is a unix socket, 0600 and owned by the daemon's user.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading

from cusetpm.rm import ResourceManager
from cusetpm.rm.status import snapshot

log = logging.getLogger(__name__)

DEFAULT_CONTROL = "/run/cusetpm/control"


class ControlServer:
    def __init__(self, rm: ResourceManager, path: str):
        self.rm = rm
        self.path = path
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket of an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # 0600 from the start: never briefly world-connectable
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(8)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()
        log.info("control socket at %s", self.path)

    def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed by stop()
            with conn:
                try:
                    conn.sendall(json.dumps(snapshot(self.rm)).encode() + b"\n")
                except Exception:
                    log.exception("control socket: a status request failed")

    def stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):  # wakes the accept() of the control thread
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def read_status(path: str, timeout: float = 10.0) -> dict:
    """What the daemon at `path` reports (the client side of `cusetpm status`)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    result: dict = json.loads(b"".join(chunks))
    return result


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]


def format_text(status: dict) -> str:
    """Aligned text tables: nodes and their spaces, the TPM, counters, per-command figures."""
    out: list[str] = []
    limits = status.get("node_limits", {})
    for node, spaces in sorted(status["nodes"].items()):
        quota = ", ".join(f"{k} {v}" for k, v in sorted(limits.get(node, {}).items()))
        out.append(f"node {node or '-'}: {len(spaces)} open"
                   + (f" (limits: {quota})" if quota else ""))
        rows = [[s["space"], s["pid"], s["uid"], f"{s['age']:.1f}s", s["commands"], s["objects"],
                 s["sessions"], s["last_command"] or "-", s["last_rc"] or "-"] for s in spaces]
        out += ["  " + line for line in _table(
            rows, ["space", "pid", "uid", "age", "commands", "objects", "sessions", "last",
                   "rc"])]
    tpm = status["tpm"]
    out.append(f"tpm {tpm['backend']}: sessions {tpm['sessions_active']} of "
               f"{tpm['sessions_max']}, context-gap window {tpm['context_gap_window']} "
               f"({tpm['context_gap_left']} saves left)")
    slots = tpm["slots"]
    out.append(f"  slots: sessions {slots['sessions_loaded']} loaded, "
               f"{slots['sessions_saved']} saved, {slots['sessions_free']} free; "
               f"objects {slots['objects_resident']} resident of {slots['objects_max']}, "
               f"{slots['objects_free']} free")
    c = status["counters"]
    out.append(f"since start ({status['uptime']:.0f}s): {c['commands']} commands, "
               f"{c['round_trips']} TPM round trips, {c['evictions']} evictions, "
               f"{c['session_waits']} session waits, {c['regap_refreshes']} regap refreshes")
    for node, reasons in sorted(c["refusals"].items()):
        for reason, count in sorted(reasons.items()):
            out.append(f"  refused on {node}: {count} x {reason}")
    rows = [[name, v["count"], v["p50_us"], v["p99_us"]]
            for name, v in status["per_command"].items()]
    out += _table(rows, ["command", "count", "p50 us", "p99 us"])
    return "\n".join(out) + "\n"
