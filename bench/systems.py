"""The systems a benchmark drives, all on one swtpm: direct, the RM in process, the node, abrmd.

swtpm serves one data connection at a time: while one client is connected, the next one's
connect waits in the listen backlog until the first closes. tpm2-abrmd and the cusetpm
daemon each keep their connection for as long as they run. So a system *holds* the swtpm
only inside its `running()` context: the direct client connects, the RM in process opens a
backend, the node and abrmd are started as processes, and everything is closed, flushed
and stopped on the way out. The benchmarks run the systems one after another and repeat
that in rounds (in rotating order), so a drift in machine speed hits every system alike.

A `CountingProxy` between a system and swtpm counts the TPM commands that system sends:
the round trips per client command, taken at the backend for the node and abrmd alike. It
costs a thread hop per command, so it is used only for counting passes, never for timing.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bench.forwarder import relay_ctrl
from bench.workloads import Transmit, flush_all
from cusetpm.backends.base import BackendError
from cusetpm.backends.swtpm import SwtpmBackend, SwtpmProcess, free_port_pair
from cusetpm.rm import ResourceManager, RMConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ABRMD = "/usr/sbin/tpm2-abrmd"
ABRMD_MAX_CONNECTIONS = 100  # tpm2-abrmd refuses more ("must be between 1 and 100")


class Client(Protocol):
    def transmit(self, command: bytes) -> bytes: ...

    def close(self) -> None: ...


@dataclass
class Running:
    """A system holding the swtpm: how to open a client, and what can be looked at."""

    connect: Callable[[], Client]
    pid: int | None = None  # the serving process (RSS), when it is not this one
    rm: ResourceManager | None = None  # the RM in process (round trips, wait stats)
    concurrent: bool = True  # several clients may be open at once


class System(Protocol):
    name: str
    short: str

    def running(self, port: int) -> contextlib.AbstractContextManager[Running]:
        """Hold the swtpm listening on 127.0.0.1:port (data) and port + 1 (control)."""
        ...


def raise_fd_limit() -> int:
    """Thousands of open descriptors need more than the usual soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int | None = None) -> int:
    """Resident set size in KiB from /proc/PID/status (this process if pid is None)."""
    status = Path(f"/proc/{pid if pid else 'self'}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- one swtpm for everything -------------------------------------------------------------


@contextmanager
def swtpm(workdir: Path) -> Iterator[SwtpmProcess]:
    """A `swtpm socket` on TCP, started up once (every system then sees TPM_RC_INITIALIZE)."""
    # free_port_pair has failed ("no free pair of TCP ports") on a machine busy with other
    # runs' connections; a moment later it finds one.
    for attempt in range(5):
        try:
            proc = SwtpmProcess(workdir / "swtpm-state").start()
            break
        except BackendError:
            if attempt == 4:
                raise
            time.sleep(1.0)
    try:
        proc.backend().close()  # Startup(CLEAR)
        yield proc
    finally:
        proc.stop()


# --- the systems --------------------------------------------------------------------------


class _BackendClient:
    """The direct client: raw TPM commands on the swtpm's own socket, nothing between."""

    def __init__(self, backend: SwtpmBackend) -> None:
        self.backend = backend
        self.transmit = backend.transmit

    def close(self) -> None:
        flush_all(self.backend.transmit)  # nobody else cleans up after a direct client


class Direct:
    name, short = "TPM directly (swtpm socket)", "direct"

    @contextmanager
    def running(self, port: int) -> Iterator[Running]:
        backend = SwtpmBackend.tcp("127.0.0.1", port, startup=False)
        try:
            yield Running(lambda: _BackendClient(backend), concurrent=False)
        finally:
            backend.close()


class _SpaceClient:
    def __init__(self, rm: ResourceManager) -> None:
        self.rm = rm
        self.space = rm.open_space()

    def transmit(self, command: bytes) -> bytes:
        return self.rm.transmit(self.space, command)

    def close(self) -> None:
        self.rm.close_space(self.space)


@dataclass
class InProcess:
    config: RMConfig | None = None
    name: str = "cusetpm RM in process"
    short: str = "RM in process"

    @contextmanager
    def running(self, port: int) -> Iterator[Running]:
        backend = SwtpmBackend.tcp("127.0.0.1", port, startup=False)
        rm = ResourceManager(backend, self.config)
        try:
            rm.start()
            yield Running(lambda: _SpaceClient(rm), rm=rm)
        finally:
            rm.stop()
            backend.close()


class FileClient:
    """A descriptor on a node: one write of the command, one read of the response."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)

    def transmit(self, command: bytes) -> bytes:
        os.write(self.fd, command)
        return os.read(self.fd, 4096)

    def close(self) -> None:
        os.close(self.fd)


def fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (FUSE mount)"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "needs /dev/fuse and fusermount3"
    return None


@dataclass
class FuseNode:
    """`cusetpm serve --backend swtpm:tcp:... --fuse-mount DIR`, a process of its own."""

    workdir: Path
    extra_args: list[str] = field(default_factory=list)
    name: str = "cusetpm node (FUSE mount)"
    short: str = "cusetpm node"

    @contextmanager
    def running(self, port: int) -> Iterator[Running]:
        mount = Path(tempfile.mkdtemp(prefix="mnt-", dir=self.workdir))
        log = self.workdir / "serve.log"
        with log.open("ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cusetpm", "serve", "--backend",
                 f"swtpm:tcp:127.0.0.1:{port}", "--fuse-mount", str(mount),
                 "--log-level", "WARNING", *self.extra_args],
                stdout=subprocess.PIPE, stderr=log_file, cwd=PROJECT_ROOT,
            )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            line = proc.stdout.readline().decode(errors="replace") if ready else ""
            if not line.startswith("cusetpm: serving"):
                raise RuntimeError(f"cusetpm serve did not start: {line!r}; "
                                   f"{log.read_text(errors='replace')[-1000:]}")
            node = str(mount / "tpmrm0")
            yield Running(lambda: FileClient(node), pid=proc.pid)
        finally:
            stop(proc)
            if os.path.ismount(mount):
                subprocess.run(["umount", "-l", str(mount)], check=False)
            with contextlib.suppress(OSError):
                mount.rmdir()


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class SessionBus:
    """A private D-Bus session bus for tpm2-abrmd and its clients: one per process.

    The tabrmd TCTI reaches abrmd through GDBus, which keeps the process's first session-bus
    connection: once that bus is gone, a TCTI opened against a second bus fails ("Fails to
    connect to next lower layer"), so every section of a run shares one bus, and close()
    leaves it running until the process exits.
    """

    _shared: SessionBus | None = None
    address: str
    pid: int

    def __new__(cls) -> SessionBus:
        if cls._shared is None:
            out = subprocess.run(
                ["dbus-daemon", "--session", "--print-address=1", "--print-pid=1", "--fork"],
                capture_output=True, text=True, check=True, timeout=30,
            )
            address, pid = out.stdout.split()[:2]
            bus = super().__new__(cls)
            bus.address, bus.pid = address, int(pid)
            atexit.register(bus._stop)
            cls._shared = bus
        return cls._shared

    def close(self) -> None:
        """Kept for the callers' shape: the bus stops when the process exits."""

    def _stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)


def abrmd_unavailable() -> str | None:
    if not os.path.exists(ABRMD) or shutil.which("dbus-daemon") is None:
        return "tpm2-abrmd or dbus-daemon not installed (make bench-deps)"
    try:
        from tpm2_pytss import TCTILdr
    except ImportError:
        return "tpm2-pytss not installed"
    if not TCTILdr.is_available("tabrmd"):
        return "the tabrmd TCTI (libtss2-tcti-tabrmd0) is not installed"
    return None


class AbrmdClient:
    """Raw command bytes through the tabrmd TCTI: abrmd sees what every other system sees."""

    def __init__(self) -> None:
        from tpm2_pytss import TCTILdr

        self.tcti = TCTILdr("tabrmd", "bus_type=session")

    def transmit(self, command: bytes) -> bytes:
        self.tcti.transmit(command)
        return bytes(self.tcti.receive())

    def close(self) -> None:
        self.tcti.close()


@dataclass
class Abrmd:
    """tpm2-abrmd 3.0 on a private session bus, talking to the swtpm through its TCTI."""

    bus: SessionBus
    workdir: Path
    name: str = "tpm2-abrmd"
    short: str = "tpm2-abrmd"

    @contextmanager
    def running(self, port: int) -> Iterator[Running]:
        env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=self.bus.address)
        log = self.workdir / "abrmd.log"
        with log.open("ab") as log_file:
            proc = subprocess.Popen(
                [ABRMD, "--session", "--allow-root", "--flush-all",
                 f"--max-connections={ABRMD_MAX_CONNECTIONS}",
                 f"--tcti=swtpm:host=127.0.0.1,port={port}"],
                env=env, stdout=log_file, stderr=subprocess.STDOUT,
            )
        saved = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
        os.environ["DBUS_SESSION_BUS_ADDRESS"] = self.bus.address  # the TCTI reads it
        try:
            probe = self._wait_ready(proc, log)
            probe.close()
            yield Running(AbrmdClient, pid=proc.pid)
        finally:
            stop(proc)
            if saved is None:
                os.environ.pop("DBUS_SESSION_BUS_ADDRESS", None)
            else:
                os.environ["DBUS_SESSION_BUS_ADDRESS"] = saved

    @staticmethod
    def _wait_ready(proc: subprocess.Popen[bytes], log: Path) -> AbrmdClient:
        from tpm2_pytss import TSS2_Exception

        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tpm2-abrmd exited with {proc.returncode}: "
                                   f"{log.read_text(errors='replace')[-1000:]}")
            try:
                # The TCTI logs each failed attempt on stderr; keep that out of the report.
                with _quiet_stderr():
                    return AbrmdClient()
            except TSS2_Exception as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tpm2-abrmd not on the bus after 30 s ({e}): "
                                       f"{log.read_text(errors='replace')[-1000:]}") from e
                time.sleep(0.05)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# --- counting TPM commands at the backend --------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class CountingProxy:
    """TCP proxy in front of swtpm: data port counted command by command, control port passed.

    Listens on a free port pair P, P + 1 (swtpm's TCTI derives the control port as data + 1)
    and forwards each accepted connection to a connection of its own to swtpm.
    """

    def __init__(self, swtpm_port: int) -> None:
        self.upstream = swtpm_port
        self.port = free_port_pair()
        self.commands = 0
        self._lock = threading.Lock()
        self._listeners = []
        for offset, serve in ((0, self._serve_data), (1, self._serve_ctrl)):
            listener = socket.create_server(("127.0.0.1", self.port + offset))
            self._listeners.append(listener)
            threading.Thread(target=self._accept, args=(listener, offset, serve),
                             daemon=True).start()

    def _accept(self, listener: socket.socket, offset: int,
                serve: Callable[[socket.socket, socket.socket], None]) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.upstream + offset))
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=serve, args=(client, upstream), daemon=True).start()

    def _serve_data(self, client: socket.socket, upstream: socket.socket) -> None:
        with client, upstream:
            try:
                while True:
                    header = _recv_exact(client, 10)
                    size = int.from_bytes(header[2:6], "big")
                    upstream.sendall(header + _recv_exact(client, size - 10))
                    with self._lock:
                        self.commands += 1
                    header = _recv_exact(upstream, 10)
                    size = int.from_bytes(header[2:6], "big")
                    client.sendall(header + _recv_exact(upstream, size - 10))
            except (ConnectionError, OSError):
                return

    @staticmethod
    def _serve_ctrl(client: socket.socket, upstream: socket.socket) -> None:
        relay_ctrl(client, upstream)

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()


def counting(transmit: Transmit, counter: list[int]) -> Transmit:
    """A transmit that counts its calls (client commands) into counter[0]."""

    def counted(command: bytes) -> bytes:
        counter[0] += 1
        return transmit(command)

    return counted
