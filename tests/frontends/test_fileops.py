"""TpmFileOps over a real RM (libtpms in process) with recorded replies: no FUSE needed.

These pin down the request paths the node's speed depends on: a quick command on an idle
RM is answered by the write handler's return value (no reply call, nothing left in
`_waiting`); commands that must not run on the loop thread go to the RM's worker and
are answered through Replies; pollers are woken on either path.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from cusetpm.backends.libtpms import LibtpmsBackend
from cusetpm.frontends.files import TpmFileOps
from cusetpm.rm import ResourceManager, Space
from tests.frontends import tpmwire as wire


class RecordedReplies:
    """Replies as a list of (kind, request or handle, value), safe from any thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []
        self.arrived = threading.Condition()

    def _add(self, kind: str, target: Any, value: Any) -> None:
        with self.arrived:
            self.calls.append((kind, target, value))
            self.arrived.notify_all()

    def err(self, req: Any, err: int) -> None:
        self._add("err", req, err)

    def write(self, req: Any, count: int) -> None:
        self._add("write", req, count)

    def buf(self, req: Any, data: bytes) -> None:
        self._add("buf", req, data)

    def poll_notify(self, ph: Any) -> None:
        self._add("poll_notify", ph, None)

    def poll_destroy(self, ph: Any) -> None:
        self._add("poll_destroy", ph, None)

    def wait_for(self, kind: str, target: Any, timeout: float = 30.0) -> Any:
        def found() -> list[Any]:
            return [v for k, t, v in self.calls if k == kind and t is target]

        with self.arrived:
            assert self.arrived.wait_for(found, timeout), f"no {kind} for {target!r}"
            return found()[0]


@pytest.fixture
def rm(tmp_path: Path) -> Iterator[ResourceManager]:
    backend = LibtpmsBackend(tmp_path / "state")
    rm = ResourceManager(backend)
    rm.start()
    yield rm
    rm.stop()
    backend.close()


@pytest.fixture
def replies() -> RecordedReplies:
    return RecordedReplies()


@pytest.fixture
def ops(rm: ResourceManager, replies: RecordedReplies) -> TpmFileOps:
    return TpmFileOps(rm, replies)


def request(name: str) -> object:
    """A stand-in for a libfuse request: only its identity matters to TpmFileOps."""
    return type(name, (), {})()


def test_quick_command_on_idle_rm_is_answered_by_the_return_value(
    ops: TpmFileOps, replies: RecordedReplies
) -> None:
    fh = ops.open(os.O_RDWR, 0, 0, 1)
    command = wire.get_random(8)
    for _ in range(3):
        assert ops.write(request("write"), fh, command, len(command), False) == len(command)
        response = ops.read(request("read"), fh, 4096, False)
        assert isinstance(response, bytes) and wire.rc(response) == 0
        assert ops.read(request("read"), fh, 4096, False) == b""
    assert replies.calls == []
    assert ops._waiting == {}


def test_bytes_after_the_command_are_not_sent(ops: TpmFileOps, rm: ResourceManager,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[bytes] = []
    submit = rm.submit

    def spy(space: Space, command: bytes, inline_if_idle: bool = False) -> Future[bytes]:
        sent.append(command)
        return submit(space, command, inline_if_idle)

    monkeypatch.setattr(rm, "submit", spy)
    fh = ops.open(os.O_RDWR, 0, 0, 1)
    command = wire.get_random(8)
    assert ops.write(request("write"), fh, command + b"junk", len(command) + 4, False) == 16
    assert sent == [command]


@pytest.mark.parametrize(
    "command, inline",
    [(wire.get_random(8), True), (wire.start_hmac_session(), False),
     (wire.create_primary_rsa(2048), False)],
    ids=["GetRandom", "StartAuthSession", "CreatePrimary"],
)
def test_worker_only_commands_never_run_inline(
    ops: TpmFileOps, rm: ResourceManager, monkeypatch: pytest.MonkeyPatch,
    command: bytes, inline: bool,
) -> None:
    seen: list[bool] = []
    submit = rm.submit

    def spy(space: Space, command: bytes, inline_if_idle: bool = False) -> Future[bytes]:
        seen.append(inline_if_idle)
        return submit(space, command, inline_if_idle)

    monkeypatch.setattr(rm, "submit", spy)
    fh = ops.open(os.O_RDWR, 0, 0, 1)
    ops.write(request("write"), fh, command, len(command), True)
    assert seen == [inline]


def test_worker_path_answers_through_replies(ops: TpmFileOps,
                                             replies: RecordedReplies) -> None:
    fh = ops.open(os.O_RDWR, 0, 0, 1)
    command = wire.start_hmac_session()
    write = request("write")
    assert ops.write(write, fh, command, len(command), False) is None  # answered later
    assert replies.wait_for("write", write) == len(command)
    assert ops._waiting == {}  # the completion took it out again
    response = ops.read(request("read"), fh, 4096, False)
    assert isinstance(response, bytes) and wire.rc(response) == 0


def test_worker_path_error_is_the_write_errno(ops: TpmFileOps,
                                              replies: RecordedReplies) -> None:
    fh = ops.open(os.O_RDWR, 0, 0, 1)
    command = wire.create_rsa(0x80123456)  # a handle this space does not have
    write = request("write")
    assert ops.write(write, fh, command, len(command), False) is None
    assert replies.wait_for("err", write) == errno.EINVAL
    assert ops._waiting == {}


def test_inline_error_is_the_write_errno_or_the_next_read(ops: TpmFileOps) -> None:
    fh = ops.open(os.O_RDWR, 0, 0, 1)
    command = wire.flush_context(0x80123456)
    assert ops.write(request("write"), fh, command, len(command), False) == -errno.EINVAL
    assert ops.write(request("write"), fh, command, len(command), True) == len(command)
    assert ops.read(request("read"), fh, 4096, True) == -errno.EINVAL
    assert ops.read(request("read"), fh, 4096, True) == b""


def test_poller_is_woken_when_an_inline_command_completes(
    ops: TpmFileOps, replies: RecordedReplies
) -> None:
    fh = ops.open(os.O_RDWR | os.O_NONBLOCK, 0, 0, 1)
    handle = request("poll handle")
    assert ops.poll(fh, handle) & select.POLLOUT
    command = wire.get_random(8)
    assert ops.write(request("write"), fh, command, len(command), True) == len(command)
    assert replies.calls == [("poll_notify", handle, None)]
    assert ops.poll(fh, None) & select.POLLIN


def test_whole_read_hands_out_the_response_itself(ops: TpmFileOps) -> None:
    """The usual read takes the stored bytes as they are; partial reads still work."""
    fh = ops.open(os.O_RDWR, 0, 0, 1)
    command = wire.get_random(8)
    ops.write(request("write"), fh, command, len(command), False)
    stored = ops._files[fh].response
    assert ops.read(request("read"), fh, 4096, False) is stored
    ops.write(request("write"), fh, command, len(command), False)
    whole = ops._files[fh].response
    assert whole is not None
    parts = [ops.read(request("read"), fh, 7, False) for _ in range(3)]
    assert b"".join(p for p in parts if isinstance(p, bytes)) == whole
