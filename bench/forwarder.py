"""A forwarder in front of swtpm that counts TPM commands and can make the TPM slow.

`Forwarder(swtpm_port, delay)` listens on a free TCP port pair P, P + 1 (swtpm's TCTI and
cusetpm's swtpm backend derive the control port as data + 1) and forwards each connection to
one of its own to swtpm. On the data port it reads whole TPM commands (the header's size),
counts each one by command code in a `Tally`, holds it for `delay` seconds, and passes it on;
the control port is passed through untouched and uncounted.

The delay stands for a discrete TPM's round trip (a few milliseconds on a bus, against tens
of microseconds for swtpm): the same fixed cost added to every TPM command, whoever sends it,
so a resource manager that sends more commands pays for each of them, as it would on a chip.

`Tally` and `hold` are shared with the guest's vtpm-proxy forwarder (bench.vtpm_forwarder).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from cusetpm.backends.swtpm import free_port_pair
from cusetpm.tpm.constants import cc_name

HEADER = 10


@dataclass
class Tally:
    """TPM commands seen, in all and by command code; safe to share between threads."""

    commands: int = 0
    by_cc: Counter[int] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, command: bytes) -> None:
        cc = int.from_bytes(command[6:10], "big")
        with self._lock:
            self.commands += 1
            self.by_cc[cc] += 1

    def snapshot(self) -> tuple[int, Counter[int]]:
        with self._lock:
            return self.commands, Counter(self.by_cc)


def since(tally: Tally, before: tuple[int, Counter[int]]) -> tuple[int, Counter[int]]:
    """What `tally` counted after `before` (a snapshot)."""
    now, by_cc = tally.snapshot()
    by_cc.subtract(before[1])
    return now - before[0], +by_cc


def describe(by_cc: Counter[int], per: int) -> str:
    """'ContextLoad 1, ReadPublic 1, FlushContext 1': commands per client command, by code."""
    parts = []
    for cc, n in sorted(by_cc.items(), key=lambda item: -item[1]):
        name = cc_name(cc).removeprefix("TPM2_")
        parts.append(f"{name} {n / per:.2g}")
    return ", ".join(parts)


def hold(delay: float) -> None:
    """Wait `delay` seconds: sleep most of it, spin the last 0.2 ms (sleep overshoots)."""
    if delay <= 0:
        return
    deadline = time.perf_counter() + delay
    if delay > 0.0004:
        time.sleep(delay - 0.0002)
    while time.perf_counter() < deadline:
        pass


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def recv_message(sock: socket.socket) -> bytes:
    """One TPM command or response: the 10-byte header, then the rest its size names."""
    header = recv_exact(sock, HEADER)
    size = int.from_bytes(header[2:6], "big")
    if size < HEADER:
        raise ConnectionError(f"bad TPM message size {size}")
    return header + recv_exact(sock, size - HEADER)


class Forwarder:
    """Counting, optionally delaying TCP forwarder in front of a `swtpm socket`."""

    def __init__(self, swtpm_port: int, delay: float = 0.0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.upstream = swtpm_port
        self.delay = delay
        self.tally = Tally()
        self.port = free_port_pair(host)
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        for offset, serve in ((0, self._serve_data), (1, self._serve_ctrl)):
            listener = socket.create_server((host, self.port + offset))
            self._listeners.append(listener)
            thread = threading.Thread(target=self._accept, args=(listener, offset, serve),
                                      name=f"forwarder-{self.port + offset}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self, listener: socket.socket, offset: int,
                serve: Callable[[socket.socket, socket.socket], None]) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection((self.host, self.upstream + offset))
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=serve, args=(client, upstream), daemon=True).start()

    def _serve_data(self, client: socket.socket, upstream: socket.socket) -> None:
        with client, upstream:
            try:
                while True:
                    command = recv_message(client)
                    self.tally.add(command)
                    hold(self.delay)
                    upstream.sendall(command)
                    client.sendall(recv_message(upstream))
            except (ConnectionError, OSError):
                return

    @staticmethod
    def _serve_ctrl(client: socket.socket, upstream: socket.socket) -> None:
        relay_ctrl(client, upstream)

    def close(self) -> None:
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for thread in self._threads:
            thread.join(2)


def relay_ctrl(client: socket.socket, upstream: socket.socket) -> None:
    """swtpm's control channel, passed through both ways unchanged until either side closes."""

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    other = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    other.start()
    pump(client, upstream)
    other.join(5)
    client.close()
    upstream.close()
