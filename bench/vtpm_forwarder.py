"""A kernel TPM chip served from user space: tpm_vtpm_proxy in front of a `swtpm socket`.

Run in the guest (it needs the tpm_vtpm_proxy module and root). `VtpmForwarder` asks
/dev/vtpmx for a new TPM 2.0 chip (VTPM_PROXY_IOC_NEW_DEV); the kernel then registers
/dev/tpmN and its resource manager /dev/tpmrmN, and every command the kernel sends the chip
arrives on the returned descriptor. A thread reads each one, counts it in a
`bench.forwarder.Tally`, holds it for `delay` seconds, sends it to swtpm over TCP and writes
the answer back. So the kernel's /dev/tpmrmN and cusetpm's `--backend device:/dev/tpmN` sit
on the same chip, with the same delay per TPM command, counted at the same place.

The proxy's own locality request (TPM2_CC_SET_LOCALITY, a vendor code swtpm's socket
interface does not know) is answered here and not counted: it is the driver's, not a TPM
command of either resource manager.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path

from bench.forwarder import Tally, hold, recv_message

log = logging.getLogger(__name__)

VTPMX = "/dev/vtpmx"
VTPM_PROXY_FLAG_TPM2 = 1
# _IOWR(0xa1, 0x00, struct vtpm_proxy_new_dev): five u32, flags in, tpm_num/fd/major/minor out
VTPM_PROXY_IOC_NEW_DEV = (3 << 30) | (20 << 16) | (0xA1 << 8)
TPM2_CC_SET_LOCALITY = 0x20001000
SUCCESS = struct.pack(">HII", 0x8001, 10, 0)
# TPM2_SelfTest(fullTest = YES). Under TCG, libtpms's first full self-test takes longer than
# the kernel waits for the one it sends while registering the chip (then "Operation Timed
# out" and no chip); run once before, the kernel's (fullTest = NO) has nothing left to test.
FULL_SELF_TEST = struct.pack(">HIIB", 0x8001, 11, 0x143, 1)


class VtpmForwarder:
    """A vtpm-proxy chip whose commands go to swtpm on 127.0.0.1:`swtpm_port`."""

    def __init__(self, swtpm_port: int, delay: float = 0.0, *, spin: bool = False) -> None:
        self.delay = delay  # read per command: a run may change it between passes
        self.spin = spin
        self.tally = Tally()
        self.upstream = socket.create_connection(("127.0.0.1", swtpm_port))
        self.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream.sendall(FULL_SELF_TEST)
        recv_message(self.upstream)
        request = bytearray(struct.pack("=5I", VTPM_PROXY_FLAG_TPM2, 0, 0, 0, 0))
        vtpmx = os.open(VTPMX, os.O_RDWR)
        try:
            fcntl.ioctl(vtpmx, VTPM_PROXY_IOC_NEW_DEV, request)
        finally:
            os.close(vtpmx)
        _, self.number, self.fd, _, _ = struct.unpack("=5I", request)
        self.chip = f"/dev/tpm{self.number}"
        self.rm = f"/dev/tpmrm{self.number}"
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="vtpm-forwarder", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """The kernel registers the chip (its own startup commands) after the ioctl returns."""
        deadline = time.monotonic() + timeout
        while not (Path(self.chip).exists() and Path(self.rm).exists()):
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{self.chip} / {self.rm} did not appear")
            time.sleep(0.05)

    def _serve(self) -> None:
        while not self._closed:
            try:
                command = os.read(self.fd, 4096)
            except OSError as e:
                if not self._closed:
                    log.warning("vtpm-proxy %s: read: %s", self.chip, e)
                return
            if not command:
                return
            if int.from_bytes(command[6:10], "big") == TPM2_CC_SET_LOCALITY:
                os.write(self.fd, SUCCESS)
                continue
            received = time.monotonic()
            self.tally.add(command)
            if self.spin:
                hold(self.delay)
            elif self.delay > 0:
                time.sleep(self.delay)  # no spinning in a guest with few, emulated CPUs
            try:
                self.upstream.sendall(command)
                response = recv_message(self.upstream)
            except (ConnectionError, OSError) as e:
                log.warning("vtpm-proxy %s: swtpm: %s", self.chip, e)
                return
            log.debug("vtpm-proxy %s: cc 0x%08x -> rc 0x%08x in %.1f ms", self.chip,
                      int.from_bytes(command[6:10], "big"), int.from_bytes(response[6:10], "big"),
                      (time.monotonic() - received) * 1000)
            try:
                os.write(self.fd, response)
            except OSError as e:
                # EPIPE: the kernel gave up on the chip (its registration failed) or it closed
                log.warning("vtpm-proxy %s: write: %s", self.chip, e)
                return

    def close(self) -> None:
        """Closing the proxy's descriptor removes the chip."""
        self._closed = True
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self._thread.join(5)
        self.upstream.close()
