"""Bring up the systems under test: swtpm, cusetpm (FUSE or CUSE), tpm2-abrmd, the kernel's node.

Context managers that yield a :class:`Target` (or a port) and stop only the
processes they started. Used on the host (bench/conformance.py, the test) and in
the guest (bench/scenarios/guest.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench.scenarios.conn import Target
from bench.systems import stop

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SERVING_LINE = b"cusetpm: serving "


class SystemUnavailable(RuntimeError):
    """A system could not be brought up; the message says why (for the table)."""


def free_port_pair() -> int:
    """A port P with P and P+1 free (swtpm's data and control ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise SystemUnavailable("no free port pair for swtpm")


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemUnavailable(f"swtpm exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise SystemUnavailable(f"swtpm did not listen on port {port} within {timeout:.0f} s")


@contextlib.contextmanager
def swtpm_socket(state: Path, timeout: float = 60.0) -> Iterator[int]:
    """A fresh ``swtpm socket --tpm2`` on 127.0.0.1 (throw-away state); yields its data port."""
    state.mkdir(parents=True, exist_ok=True)
    port = free_port_pair()
    proc = subprocess.Popen(
        ["swtpm", "socket", "--tpm2",
         "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
         "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
         "--tpmstate", f"dir={state}", "--flags", "not-need-init,startup-clear"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc, timeout)
        yield port
    finally:
        stop(proc)


@contextlib.contextmanager
def cusetpm_node(system: str, backend: str, workdir: Path, *, fuse_mount: Path | None = None,
                 name: str | None = None, extra: tuple[str, ...] = (),
                 timeout: float = 120.0) -> Iterator[Target]:
    """``cusetpm serve`` on ``backend`` as a FUSE file (fuse_mount) or a CUSE device (name)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"cusetpm-{system}.log"
    if fuse_mount is not None:
        where, node = ["--fuse-mount", str(fuse_mount)], str(fuse_mount / "tpmrm0")
    else:
        assert name is not None
        where, node = ["--name", name], f"/dev/{name}"
    with log.open("wb") as out:  # a file, not a pipe: nobody drains it while scenarios run
        proc = subprocess.Popen(
            [sys.executable, "-m", "cusetpm", "serve", "--backend", backend,
             "--log-level", "WARNING", *where, *extra],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
        )
    try:
        deadline = time.monotonic() + timeout
        while not (os.path.exists(node) and SERVING_LINE in log.read_bytes()):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-1500:]
                raise SystemUnavailable(f"cusetpm serve did not serve {node} "
                                        f"(exit {proc.poll()}): {tail}")
            time.sleep(0.05)
        yield Target(system, node, f"device:{node}")
    finally:
        stop(proc)
        if fuse_mount is not None and os.path.ismount(fuse_mount):
            subprocess.run(["umount", "-l", str(fuse_mount)], check=False, capture_output=True)


@contextlib.contextmanager
def tpm2_abrmd(port: int, timeout: float = 30.0) -> Iterator[Target]:
    """tpm2-abrmd on a private session bus, on the swtpm at ``port``."""
    abrmd = "/usr/sbin/tpm2-abrmd"
    if not os.path.exists(abrmd):
        raise SystemUnavailable("tpm2-abrmd not installed (/usr/sbin/tpm2-abrmd)")
    bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address=1"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        assert bus.stdout is not None
        ready, _, _ = select.select([bus.stdout], [], [], timeout)
        address = bus.stdout.readline().decode().strip() if ready else ""
        if not address:
            raise SystemUnavailable("dbus-daemon --session printed no address")
        env = {"DBUS_SESSION_BUS_ADDRESS": address}
        daemon = subprocess.Popen(
            [abrmd, "--session", "--allow-root", f"--tcti=swtpm:host=127.0.0.1,port={port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, **env},
        )
        target = Target("tpm2-abrmd", None, "tabrmd:bus_type=session", env)
        deadline = time.monotonic() + timeout
        while True:  # ready once a client gets an answer through it
            probe = subprocess.run(["tpm2_getrandom", "-T", target.tcti, "4"],
                                   env={**os.environ, **env}, capture_output=True, check=False)
            if probe.returncode == 0:
                break
            if daemon.poll() is not None or time.monotonic() > deadline:
                err = daemon.stderr.read().decode(errors="replace") if daemon.poll() else ""
                raise SystemUnavailable(f"tpm2-abrmd did not come up: {err[-800:]}"
                                        f"{probe.stderr.decode(errors='replace')[-400:]}")
            time.sleep(0.2)
        yield target
    finally:
        if daemon is not None:
            stop(daemon)
        stop(bus)


@contextlib.contextmanager
def kernel_tpmrm(state: Path, timeout: float = 60.0) -> Iterator[Target]:
    """The kernel's /dev/tpmrmN: ``modprobe tpm_vtpm_proxy`` + ``swtpm chardev --vtpm-proxy``."""
    subprocess.run(["modprobe", "tpm_vtpm_proxy"], check=True, capture_output=True)
    state.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["swtpm", "chardev", "--vtpm-proxy", "--tpm2", "--tpmstate", f"dir={state}",
         "--flags", "startup-clear"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        seen = ""
        deadline = time.monotonic() + timeout
        while (match := re.search(r"New TPM device: /dev/tpm(\d+)", seen)) is None:
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([proc.stdout], [], [], left)
            line = proc.stdout.readline() if ready else b""
            if not line:
                raise SystemUnavailable(f"swtpm chardev --vtpm-proxy made no device: {seen!r}")
            seen += line.decode(errors="replace")
        node = f"/dev/tpmrm{match.group(1)}"
        while not os.path.exists(node):
            if time.monotonic() > deadline:
                raise SystemUnavailable(f"{node} did not appear")
            time.sleep(0.05)
        yield Target("kernel", node, f"device:{node}")
    finally:
        stop(proc)
