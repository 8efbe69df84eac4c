"""swtpm over its socket interface.

Data channel (``--server type=tcp,port=N`` or ``type=unixio,path=P``): raw TPM
commands and responses on one persistent connection, framed only by the TPM
header's size field.

Control channel (``--ctrl type=tcp,port=N+1`` or ``type=unixio,path=P.ctrl``):
``u32 cmd | payload`` in, ``u32 result | payload`` out, big-endian, with the
command numbers of swtpm's include/swtpm/tpm_ioctl.h. Each control request uses
its own short connection: that keeps cancel() independent of the data channel and
of any other control request running on another thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cusetpm.tpm.commands import startup
from cusetpm.tpm.constants import TPM_SU
from cusetpm.tpm.rc import TPM_RC

from .base import HEADER_SIZE, Backend, BackendError, check_response, header_size, response_code

log = logging.getLogger(__name__)

# Control channel command numbers (tpm_ioctl.h, "Commands used by the non-CUSE TPMs").
CMD_GET_CAPABILITY = 0x01
CMD_INIT = 0x02
CMD_SHUTDOWN = 0x03
CMD_SET_LOCALITY = 0x05
CMD_CANCEL_TPM_CMD = 0x09
CMD_STORE_VOLATILE = 0x0A
CMD_STOP = 0x0E

# Capability bits of CMD_GET_CAPABILITY.
PTM_CAP_INIT = 1 << 0
PTM_CAP_SHUTDOWN = 1 << 1
PTM_CAP_SET_LOCALITY = 1 << 3
PTM_CAP_CANCEL_TPM_CMD = 1 << 5
PTM_CAP_STORE_VOLATILE = 1 << 6

PTM_INIT_FLAG_DELETE_VOLATILE = 1 << 0

_STARTUP_CLEAR = startup(TPM_SU.CLEAR)

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

# Long enough for the slowest RSA key generation; a TPM that says nothing for
# this long is treated as gone.
DEFAULT_TIMEOUT = 300.0
# reopen() gives up on a connect after this long: the RM retries with backoff, and a
# swtpm on this machine either accepts or refuses at once.
REOPEN_TIMEOUT = 2.0


@dataclass(frozen=True)
class Address:
    """Where a swtpm channel listens."""

    family: socket.AddressFamily
    target: str | tuple[str, int]

    def describe(self) -> str:
        if isinstance(self.target, str):
            return f"unix:{self.target}"
        host, port = self.target
        return f"tcp:{host}:{port}"

    def connect(self, timeout: float) -> socket.socket:
        if self.family == socket.AF_UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(self.target)
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.create_connection(self.target, timeout=timeout)  # type: ignore[arg-type]
        # Commands go out in one send, but without NODELAY a small request behind
        # an unacknowledged one waits for the delayed ACK (~40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionResetError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


class SwtpmBackend(Backend):
    """A running ``swtpm socket``.

    The data connection is opened lazily and kept. If swtpm dropped it while idle,
    the next transmit notices before sending and reconnects once. A connection
    that breaks after a command went out is not retried (the TPM may have run the
    command; running it twice is worse than an error): that is a BackendError and
    the following transmit reconnects. With auto_reconnect off (the RM's choice) a
    dropped connection is a BackendError until reopen() reconnects.
    """

    def __init__(
        self,
        data: Address,
        ctrl: Address | None,
        *,
        startup: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.data = data
        self.ctrl = ctrl
        self.timeout = timeout
        self.name = f"swtpm:{data.describe()}"
        self._sock: socket.socket | None = None
        self._poller = select.poll()
        self._closed = False
        self._connect()
        if startup:
            try:
                self._startup()
            except BaseException:
                self.close()
                raise

    @classmethod
    def tcp(cls, host: str, port: int, ctrl_port: int | None = None, *,
            startup: bool = True, timeout: float = DEFAULT_TIMEOUT) -> SwtpmBackend:
        ctrl = Address(socket.AF_INET, (host, ctrl_port if ctrl_port is not None else port + 1))
        return cls(Address(socket.AF_INET, (host, port)), ctrl, startup=startup, timeout=timeout)

    @classmethod
    def unix(cls, path: str | os.PathLike[str], ctrl_path: str | os.PathLike[str] | None = None,
             *, startup: bool = True, timeout: float = DEFAULT_TIMEOUT) -> SwtpmBackend:
        path = os.fspath(path)
        ctrl = os.fspath(ctrl_path) if ctrl_path is not None else path + ".ctrl"
        return cls(Address(socket.AF_UNIX, path), Address(socket.AF_UNIX, ctrl),
                   startup=startup, timeout=timeout)

    # --- data channel --------------------------------------------------------

    def _connect(self, timeout: float | None = None) -> socket.socket:
        try:
            sock = self.data.connect(timeout or self.timeout)
            sock.settimeout(self.timeout)
        except OSError as e:
            raise BackendError(f"{self.name}: cannot connect: {e}") from e
        # poll, not select: the daemon may hold more than FD_SETSIZE descriptors.
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._sock = sock
        return sock

    def _live_socket(self) -> socket.socket:
        """The data socket, reconnected if swtpm closed it since the last command."""
        sock = self._sock
        if sock is None:
            if not self.auto_reconnect:
                raise BackendError(f"{self.name}: not connected (the connection was lost)")
            return self._connect()
        # Between commands nothing may be readable; readable means EOF or junk.
        if self._poller.poll(0):
            self._drop()
            if not self.auto_reconnect:
                raise BackendError(f"{self.name}: swtpm closed the data connection")
            log.info("%s: data connection went stale, reconnecting", self.name)
            return self._connect()
        return sock

    def reopen(self) -> None:
        """A new data connection (swtpm restarted, or dropped ours)."""
        if self._closed:
            raise BackendError(f"{self.name}: reopen of a closed backend")
        self._drop()
        self._connect(min(self.timeout, REOPEN_TIMEOUT))

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def transmit(self, command: bytes) -> bytes:
        if self._closed:
            raise BackendError(f"{self.name}: transmit on a closed backend")
        sock = self._live_socket()
        try:
            sock.sendall(command)
        except (BrokenPipeError, ConnectionResetError) as e:
            if not self.auto_reconnect:
                self._drop()
                raise BackendError(f"{self.name}: send failed: {e}") from e
            # Refused before the TPM saw a byte of it: safe to try once more.
            log.info("%s: send failed (%s), reconnecting once", self.name, e)
            self._drop()
            sock = self._connect()
            try:
                sock.sendall(command)
            except OSError as e2:
                self._drop()
                raise BackendError(f"{self.name}: send failed after reconnecting: {e2}") from e2
        except OSError as e:
            self._drop()
            raise BackendError(f"{self.name}: send failed: {e}") from e
        return self._receive(sock)

    def _receive(self, sock: socket.socket) -> bytes:
        try:
            header = _recv_exact(sock, HEADER_SIZE)
            size = header_size(self.name, header)
            if size < HEADER_SIZE:
                raise BackendError(f"{self.name}: response header claims {size} bytes")
            response = header + _recv_exact(sock, size - HEADER_SIZE)
        except TimeoutError as e:
            self._drop()
            raise BackendError(f"{self.name}: no response within {self.timeout} s") from e
        except OSError as e:
            self._drop()
            raise BackendError(f"{self.name}: receive failed: {e}") from e
        except BackendError:
            self._drop()
            raise
        # With the size taken from the header the lengths match by construction;
        # whatever follows the response would be left in the socket, and the stale
        # check of the next transmit finds it.
        return check_response(self.name, response)

    def _startup(self) -> None:
        rc = response_code(self.transmit(_STARTUP_CLEAR))
        if rc not in (TPM_RC.SUCCESS, TPM_RC.INITIALIZE):
            raise BackendError(f"{self.name}: Startup(SU_CLEAR) failed with rc 0x{rc:x}")

    # --- control channel -----------------------------------------------------

    def control(self, cmd: int, payload: bytes = b"", reply_size: int = 4) -> bytes:
        """One control-channel request; returns the reply (result word first)."""
        if self.ctrl is None:
            raise BackendError(f"{self.name}: no control channel configured")
        try:
            with self.ctrl.connect(self.timeout) as sock:
                sock.sendall(_U32.pack(cmd) + payload)
                return _recv_exact(sock, reply_size)
        except OSError as e:
            raise BackendError(
                f"{self.name}: control command 0x{cmd:x} on {self.ctrl.describe()} failed: {e}"
            ) from e

    def _control_result(self, cmd: int, payload: bytes = b"") -> None:
        result = _U32.unpack(self.control(cmd, payload))[0]
        if result != 0:
            raise BackendError(f"{self.name}: control command 0x{cmd:x} returned 0x{result:x}")

    def get_capability(self) -> int:
        """The PTM_CAP_* bits swtpm supports."""
        # Old swtpm answers a bare u64; newer ones u32 result + u32 caps, which is
        # the same eight bytes when the result is 0.
        return int(_U64.unpack(self.control(CMD_GET_CAPABILITY, reply_size=8))[0])

    def init(self, delete_volatile: bool = False) -> None:
        """CMD_INIT: (re)initialize the TPM, like a power cycle. Needs Startup after."""
        flags = PTM_INIT_FLAG_DELETE_VOLATILE if delete_volatile else 0
        self._control_result(CMD_INIT, _U32.pack(flags))
        # swtpm restarts the TPM; our data connection survives, but start clean.
        self._drop()

    def shutdown(self) -> None:
        """CMD_SHUTDOWN: swtpm terminates the TPM and exits."""
        self._control_result(CMD_SHUTDOWN)
        self._drop()

    def set_locality(self, locality: int) -> None:
        if not 0 <= locality <= 4:
            raise ValueError(f"locality {locality} is not 0..4")
        self._control_result(CMD_SET_LOCALITY, bytes([locality]))

    def store_volatile(self) -> None:
        """CMD_STORE_VOLATILE: write the volatile state to the state directory."""
        self._control_result(CMD_STORE_VOLATILE)

    def cancel(self) -> None:
        """Send CMD_CANCEL_TPM_CMD without waiting for the answer.

        swtpm 0.7.1 serves the control channel on the thread that runs the TPM, so
        the request is read only after the running command has finished (and is
        then answered with TPM_FAIL): on that swtpm a cancel never shortens a
        command. The request goes out from a helper thread so that the caller (a
        FUSE interrupt, say) is never held up for the length of the command.
        """
        if self._closed or self.ctrl is None:
            return
        threading.Thread(target=self._cancel_now, name="swtpm-cancel", daemon=True).start()

    def _cancel_now(self) -> None:
        try:
            result = _U32.unpack(self.control(CMD_CANCEL_TPM_CMD))[0]
        except BackendError as e:
            log.debug("%s: cancel failed: %s", self.name, e)
            return
        log.debug("%s: cancel answered 0x%x", self.name, result)

    def close(self) -> None:
        # The swtpm process is not ours: closing only drops our connection.
        self._closed = True
        self._drop()


# --- a swtpm process, for tests and benchmarks ------------------------------------


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P with P and P+1 free right now (swtpm wants data and control).

    Taken below the kernel's ephemeral range: there, thousands of short connections (tpm2-tss's
    swtpm TCTI connects once per command) can hold every port for a minute after they close.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10000, max(10002, low - 1))
        if _bindable(host, port) and _bindable(host, port + 1):
            return port
    raise BackendError("no free pair of TCP ports")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a listener binds
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class SwtpmProcess:
    """A ``swtpm socket --tpm2`` child process on TCP ports or a unix socket."""

    state_dir: Path
    transport: str = "tcp"  # "tcp" or "unix"
    host: str = "127.0.0.1"
    port: int = 0
    socket_path: Path | None = None
    flags: str = "not-need-init"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _tmpdir: str | None = field(default=None, repr=False)
    _log: Path | None = field(default=None, repr=False)

    @property
    def spec(self) -> str:
        """The open_backend spec that reaches this swtpm."""
        if self.transport == "unix":
            return f"swtpm:unix:{self.socket_path}"
        return f"swtpm:tcp:{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> SwtpmProcess:
        exe = shutil.which("swtpm")
        if exe is None:
            raise BackendError("swtpm is not installed")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._tmpdir = tempfile.mkdtemp(prefix="cusetpm-swtpm-")
        self._log = Path(self._tmpdir) / "swtpm.log"
        if self.transport == "unix":
            self.socket_path = self.socket_path or Path(self._tmpdir) / "swtpm.sock"
            server = f"type=unixio,path={self.socket_path}"
            ctrl = f"type=unixio,path={self.socket_path}.ctrl"
        else:
            self.port = self.port or free_port_pair(self.host)
            server = f"type=tcp,bindaddr={self.host},port={self.port}"
            ctrl = f"type=tcp,bindaddr={self.host},port={self.port + 1}"
        argv = [exe, "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}",
                "--server", server, "--ctrl", ctrl, "--flags", self.flags,
                "--log", f"file={self._log},level=1"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_ready(timeout)
        return self

    def backend(self, *, startup: bool = True) -> SwtpmBackend:
        if self.transport == "unix":
            assert self.socket_path is not None
            return SwtpmBackend.unix(self.socket_path, startup=startup)
        return SwtpmBackend.tcp(self.host, self.port, startup=startup)

    def _ctrl_address(self) -> Address:
        if self.transport == "unix":
            return Address(socket.AF_UNIX, f"{self.socket_path}.ctrl")
        return Address(socket.AF_INET, (self.host, self.port + 1))

    def _wait_ready(self, timeout: float) -> None:
        # Ready once the control channel answers CMD_GET_CAPABILITY; the data
        # socket is created before it.
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BackendError(f"swtpm exited with {self.proc.returncode}: {self.log_text()}")
            try:
                with self._ctrl_address().connect(1.0) as sock:
                    sock.sendall(_U32.pack(CMD_GET_CAPABILITY))
                    _recv_exact(sock, 8)
                return
            except OSError:
                time.sleep(0.005)
        self.stop()
        raise BackendError(f"swtpm did not come up within {timeout} s")

    def log_text(self) -> str:
        try:
            return self._log.read_text() if self._log else ""
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the TPM state is concerned."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM and wait; SIGKILL if it lingers. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._tmpdir is not None:
            if self.socket_path is not None and self.socket_path.parent == Path(self._tmpdir):
                self.socket_path = None  # ours, and gone with the directory
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> SwtpmProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


