"""The node's file semantics are the kernel's (drivers/char/tpm/tpm-dev-common.c).

Raw os.open/os.write/os.read on DIR/tpmrm0 of a `cusetpm serve --fuse-mount` daemon.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterator

import pytest

from tests.frontends import tpmwire as wire


@pytest.fixture
def fd(node: str) -> Iterator[int]:
    fd = os.open(node, os.O_RDWR)
    yield fd
    os.close(fd)


@pytest.fixture
def nbfd(node: str) -> Iterator[int]:
    fd = os.open(node, os.O_RDWR | os.O_NONBLOCK)
    yield fd
    os.close(fd)


def oserror(func, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        func(*args)
    return int(info.value.errno or 0)


def poll_once(fd: int, events: int, timeout_ms: int) -> int:
    p = select.poll()
    p.register(fd, events)
    ready = p.poll(timeout_ms)
    return ready[0][1] if ready else 0


def test_round_trip(fd: int) -> None:
    assert os.write(fd, wire.get_random(8)) == 12
    response = os.read(fd, 4096)
    assert wire.rc(response) == 0 and len(response) == 10 + 2 + 8
    assert os.read(fd, 4096) == b""  # then 0: Python's FileIO.readall depends on it


def test_write_over_4096_is_e2big(fd: int) -> None:
    big = wire.get_random(8) + bytes(4097 - 12)
    assert oserror(os.write, fd, big) == errno.E2BIG
    assert oserror(os.write, fd, bytes(5000)) == errno.E2BIG  # before any other check


def test_e2big_comes_before_ebusy(fd: int) -> None:
    os.write(fd, wire.get_random(8))
    assert oserror(os.write, fd, bytes(4097)) == errno.E2BIG
    assert wire.rc(os.read(fd, 4096)) == 0


@pytest.mark.parametrize("command", [
    bytes(0)[:0] + b"\x80\x01\x00\x00\x00\x0a\x00\x00\x01",  # 9 bytes: shorter than a header
    b"\x80\x01",
    b"\x80\x01\x00\x00\x00\x0c\x00\x00\x01\x7b",  # header says 12, only 10 written
    b"\x80\x01\x00\x00\x00\x04\x00\x00\x01\x7b\x00\x08",  # header size below 10
])
def test_short_write_is_einval(fd: int, command: bytes) -> None:
    assert oserror(os.write, fd, command) == errno.EINVAL
    assert os.read(fd, 4096) == b""  # nothing was sent


def test_bytes_beyond_header_size_are_ignored(fd: int) -> None:
    command = wire.get_random(8) + b"garbage"
    assert os.write(fd, command) == len(command)  # the whole write is reported
    response = os.read(fd, 4096)
    assert wire.rc(response) == 0 and wire.size(response) == 20


def test_second_write_before_read_is_ebusy(fd: int) -> None:
    os.write(fd, wire.get_random(8))
    assert oserror(os.write, fd, wire.get_random(8)) == errno.EBUSY
    response = os.read(fd, 4096)  # the pending response is intact
    assert wire.rc(response) == 0 and len(response) == 20


def test_partial_reads(fd: int) -> None:
    os.write(fd, wire.get_random(16))
    head = os.read(fd, 10)
    assert len(head) == 10 and wire.size(head) == 28
    middle = os.read(fd, 5)
    rest = os.read(fd, 4096)
    assert len(middle) == 5 and len(rest) == 28 - 15
    assert os.read(fd, 4096) == b""


def test_partial_read_lets_next_write_in(fd: int) -> None:
    os.write(fd, wire.get_random(16))
    assert len(os.read(fd, 10)) == 10
    os.write(fd, wire.get_random(4))  # accepted: the unread rest is dropped
    response = os.read(fd, 4096)
    assert wire.size(response) == 16 and len(response) == 16


def test_zero_length_read_keeps_response(fd: int) -> None:
    """Known difference: the kernel's tpmrm0 discards the response on read(fd, buf, 0),
    but FUSE and CUSE answer a 0-byte read themselves (fuse_direct_io sends no request),
    so the daemon never sees it and the response stays readable."""
    os.write(fd, wire.get_random(8))
    assert os.read(fd, 0) == b""
    assert wire.rc(os.read(fd, 4096)) == 0


def test_read_with_nothing_pending_returns_zero(fd: int, nbfd: int) -> None:
    assert os.read(fd, 4096) == b""  # blocking mode too: at once, never EAGAIN
    assert os.read(nbfd, 4096) == b""


def test_nonblocking_write_then_poll(nbfd: int) -> None:
    everything = select.POLLIN | select.POLLRDNORM | select.POLLOUT | select.POLLWRNORM
    assert poll_once(nbfd, everything, 0) == select.POLLOUT | select.POLLWRNORM
    assert os.write(nbfd, wire.get_random(8)) == 12  # returns at once
    # While the command runs the file says POLLOUT (as the kernel's): wait for POLLIN only.
    assert poll_once(nbfd, select.POLLIN, 1000) & select.POLLIN
    assert poll_once(nbfd, everything, 0) == select.POLLIN | select.POLLRDNORM  # not writable
    assert wire.rc(os.read(nbfd, 4096)) == 0
    assert poll_once(nbfd, everything, 0) == select.POLLOUT | select.POLLWRNORM


def test_tcti_device_sequence(nbfd: int) -> None:
    """tpm2-tss's device TCTI: GetRandom(8), poll 1 s, header first, then the rest."""
    os.write(nbfd, wire.get_random(8))
    assert poll_once(nbfd, select.POLLIN, 1000) & select.POLLIN
    header = os.read(nbfd, 10)
    assert poll_once(nbfd, select.POLLIN, 1000) & select.POLLIN  # rest still readable
    rest = os.read(nbfd, wire.size(header) - 10)
    assert len(rest) == 10


def test_poll_sleeper_is_woken(nbfd: int) -> None:
    """A poll() already asleep when the command is written wakes on completion."""
    import threading

    result: list[int] = []
    sleeper = threading.Thread(target=lambda: result.append(poll_once(nbfd, select.POLLIN, 5000)))
    sleeper.start()
    threading.Event().wait(0.2)
    os.write(nbfd, wire.create_primary_rsa(2048))  # slow enough to be seen asleep
    sleeper.join(10)
    assert result and result[0] & select.POLLIN
    response = os.read(nbfd, 4096)
    assert wire.rc(response) == 0
    handle = int.from_bytes(response[10:14], "big")
    os.write(nbfd, wire.flush_context(handle))
    poll_once(nbfd, select.POLLIN, 5000)
    assert wire.rc(os.read(nbfd, 4096)) == 0


def test_rm_error_is_read_errno_in_nonblocking_mode(nbfd: int) -> None:
    os.write(nbfd, wire.flush_context(0x80123456))  # not a handle of this space
    assert poll_once(nbfd, select.POLLIN, 1000) & select.POLLIN  # an error is "readable"
    assert oserror(os.read, nbfd, 4096) == errno.EINVAL
    assert os.read(nbfd, 4096) == b""  # reported once
    os.write(nbfd, wire.get_random(8))  # and the file is usable again
    assert poll_once(nbfd, select.POLLIN, 1000) & select.POLLIN
    assert wire.rc(os.read(nbfd, 4096)) == 0


def test_rm_error_from_the_worker_is_read_errno(nbfd: int, fd: int) -> None:
    """The same through the RM's worker thread (slow commands never run on the loop)."""
    os.write(nbfd, wire.create_rsa(0x80123456))
    assert poll_once(nbfd, select.POLLIN, 5000) & select.POLLIN
    assert oserror(os.read, nbfd, 4096) == errno.EINVAL
    assert os.read(nbfd, 4096) == b""
    assert oserror(os.write, fd, wire.create_rsa(0x80123456)) == errno.EINVAL


def test_pending_error_makes_write_ebusy(nbfd: int) -> None:
    os.write(nbfd, wire.flush_context(0x80123456))
    poll_once(nbfd, select.POLLIN, 1000)
    assert oserror(os.write, nbfd, wire.get_random(8)) == errno.EBUSY
    assert oserror(os.read, nbfd, 4096) == errno.EINVAL


def test_rm_error_is_write_errno_in_blocking_mode(fd: int) -> None:
    assert oserror(os.write, fd, wire.flush_context(0x80123456)) == errno.EINVAL
    assert os.read(fd, 4096) == b""


def test_read_while_command_runs_waits_for_it(nbfd: int) -> None:
    os.write(nbfd, wire.create_primary_rsa(2048))
    response = os.read(nbfd, 4096)  # the kernel's reader sleeps on the buffer mutex
    assert wire.rc(response) == 0
    os.write(nbfd, wire.flush_context(int.from_bytes(response[10:14], "big")))
    poll_once(nbfd, select.POLLIN, 5000)
    assert wire.rc(os.read(nbfd, 4096)) == 0


def test_fcntl_nonblock_after_open(fd: int) -> None:
    """O_NONBLOCK set later with fcntl reaches each write (flags travel per request)."""
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    os.write(fd, wire.flush_context(0x80123456))  # nonblocking: no errno from write
    poll_once(fd, select.POLLIN, 1000)
    assert oserror(os.read, fd, 4096) == errno.EINVAL


def test_no_ioctls(fd: int) -> None:
    import fcntl

    assert oserror(fcntl.ioctl, fd, 0x5401, bytes(64)) == errno.ENOTTY  # TCGETS


def test_64_descriptors_at_once(node: str) -> None:
    fds = [os.open(node, os.O_RDWR) for _ in range(64)]
    try:
        for fd in fds:
            os.write(fd, wire.get_random(8))
        for fd in fds:
            assert wire.rc(os.read(fd, 4096)) == 0
    finally:
        for fd in fds:
            os.close(fd)


def test_spaces_are_isolated(node: str) -> None:
    a, b = os.open(node, os.O_RDWR), os.open(node, os.O_RDWR)
    try:
        os.write(a, wire.create_primary_rsa(2048))
        response = os.read(a, 4096)
        assert wire.rc(response) == 0
        handle = int.from_bytes(response[10:14], "big")
        assert handle == 0x80FFFFFF  # the kernel's first virtual handle
        os.write(b, wire.get_handles(wire.TPM_HT_TRANSIENT))
        assert wire.handles(os.read(b, 4096)) == []
        os.write(a, wire.get_handles(wire.TPM_HT_TRANSIENT))
        assert wire.handles(os.read(a, 4096)) == [handle]
        assert oserror(os.write, b, wire.flush_context(handle)) == errno.EINVAL
    finally:
        os.close(a)
        os.close(b)


def test_node_attributes(daemon) -> None:  # type: ignore[no-untyped-def]
    st = os.stat(daemon.node)
    assert st.st_mode & 0o7777 == 0o600  # default, no --mode given
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert os.listdir(daemon.mount) == ["tpmrm0"]


def test_quick_command_queues_behind_a_slow_one(node: str) -> None:
    """While one file's key generation is queued or runs, another file's GetRandom is
    answered by the worker (before the key generation if it had not started yet: the fair
    schedule, tests/rm/test_scheduling.py); both complete."""
    slow = os.open(node, os.O_RDWR | os.O_NONBLOCK)
    quick = os.open(node, os.O_RDWR)
    try:
        os.write(slow, wire.create_primary_rsa(3072))
        os.write(quick, wire.get_random(8))  # blocks until its turn
        assert wire.rc(os.read(quick, 4096)) == 0
        assert poll_once(slow, select.POLLIN, 60000) & select.POLLIN
        response = os.read(slow, 4096)
        assert wire.rc(response) == 0
        os.write(slow, wire.flush_context(int.from_bytes(response[10:14], "big")))
        poll_once(slow, select.POLLIN, 5000)
        assert wire.rc(os.read(slow, 4096)) == 0
    finally:
        os.close(slow)
        os.close(quick)


def test_session_waiter_is_served_when_another_file_closes(node: str) -> None:
    """With every TPM session taken, a new one waits in the RM; a file closing meanwhile
    (its release must get through the node) frees a session for it at once, long before
    the RM would evict an idle one."""
    holders: list[int] = []
    handles: list[int] = []  # holders[i]'s session
    waiter = os.open(node, os.O_RDWR | os.O_NONBLOCK)
    try:
        while True:  # take sessions until the TPM has none left
            fd = os.open(node, os.O_RDWR)
            holders.append(fd)
            os.write(fd, wire.start_hmac_session())
            response = os.read(fd, 4096)
            if wire.rc(response) != 0 or len(holders) > 256:
                raise AssertionError("the RM should make the last StartAuthSession wait")
            handles.append(int.from_bytes(response[10:14], "big"))
            if len(holders) >= 64:  # libtpms: TPM_PT_ACTIVE_SESSIONS_MAX = 64
                break
        os.write(waiter, wire.start_hmac_session())
        assert poll_once(waiter, select.POLLIN, 200) == 0  # it waits
        os.close(holders.pop())  # the most recently used session: never an eviction's pick
        freed = handles.pop()
        assert poll_once(waiter, select.POLLIN, 5000) & select.POLLIN
        response = os.read(waiter, 4096)
        assert wire.rc(response) == 0
        # Handed the freed session (libtpms reuses the one free slot), not one evicted from
        # an idle holder (the least recently used: another slot).
        got = int.from_bytes(response[10:14], "big")
        assert got & 0xFFFFFF == freed & 0xFFFFFF, (hex(got), hex(freed))
    finally:
        os.close(waiter)
        for fd in holders:
            os.close(fd)


@pytest.mark.parametrize("nonblock", [False, True], ids=["blocking", "O_NONBLOCK"])
def test_next_write_right_after_read_is_never_ebusy(node: str, nonblock: bool) -> None:
    """A client that writes its next command the moment it has read a response never
    meets EBUSY: the RM marks the space idle before it completes the command, on either
    path -- inline on the loop thread (GetRandom on an idle RM), or on the RM's worker
    (StartAuthSession always; GetRandom too while a second client keeps the RM busy)."""
    import threading

    stop = threading.Event()

    def keep_the_rm_busy() -> None:
        other = os.open(node, os.O_RDWR)
        try:
            while not stop.is_set():
                os.write(other, wire.get_random(8))
                os.read(other, 4096)
        finally:
            os.close(other)

    busy = threading.Thread(target=keep_the_rm_busy)
    fd = os.open(node, os.O_RDWR | (os.O_NONBLOCK if nonblock else 0))

    def transact(command: bytes) -> bytes:
        os.write(fd, command)  # EBUSY here would raise
        if nonblock:
            assert poll_once(fd, select.POLLIN, 5000) & select.POLLIN
        response = os.read(fd, 4096)
        assert wire.rc(response) == 0, hex(wire.rc(response))
        return response

    busy.start()
    try:
        for _ in range(300):
            session = int.from_bytes(transact(wire.start_hmac_session())[10:14], "big")
            transact(wire.flush_context(session))
            for _ in range(5):
                transact(wire.get_random(8))
    finally:
        stop.set()
        busy.join(10)
        os.close(fd)
