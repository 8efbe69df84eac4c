"""How to reach a TPM: libtpms in process, swtpm over a socket, a kernel /dev/tpmN.

``open_backend(spec)`` is the one entry point the rest of cusetpm uses; each
backend module is imported only when its spec is asked for.
"""

from __future__ import annotations

import os
import stat

from .base import Backend, BackendError

__all__ = ["Backend", "BackendError", "open_backend", "parse_spec", "resolve_auto"]

SPEC_HELP = ('"auto", "libtpms" (or "libtpms:STATE_DIR"), "swtpm:tcp:HOST:PORT", '
             '"swtpm:unix:PATH" or "device:/dev/tpmN"')

# `auto`: the kernel's first TPM when the machine has one, else the embedded libtpms.
AUTO_DEVICE = "/dev/tpm0"


def resolve_auto(spec: str, device: str = AUTO_DEVICE) -> str:
    """The spec `auto` stands for here: device:/dev/tpm0 if that is a character device (a
    hardware or firmware TPM the kernel drives), else libtpms. Other specs are returned."""
    if spec != "auto":
        return spec
    try:
        is_device = stat.S_ISCHR(os.stat(device).st_mode)
    except OSError:
        is_device = False
    return f"device:{device}" if is_device else "libtpms"


def parse_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """Split a backend spec into (kind, arguments); ValueError if malformed."""
    kind, _, rest = spec.partition(":")
    if spec == "auto":
        return kind, ()
    if kind == "libtpms":
        return kind, (rest,) if rest else ()
    if kind == "device" and rest:
        return kind, (rest,)
    if kind == "swtpm":
        transport, _, address = rest.partition(":")
        if transport == "unix" and address:
            return kind, (transport, address)
        if transport == "tcp":
            # rpartition: the port is after the last colon, so [::1]-style hosts work.
            host, _, port = address.rpartition(":")
            host = host.strip("[]")
            if host and port.isdigit() and 0 < int(port) < 65535:
                return kind, (transport, host, port)
    raise ValueError(f"bad backend spec {spec!r}: expected {SPEC_HELP}")


def open_backend(spec: str, state_dir: str | os.PathLike[str] | None = None) -> Backend:
    """Open the TPM that spec names. state_dir is for libtpms only."""
    kind, args = parse_spec(resolve_auto(spec))
    if kind == "libtpms":
        from .libtpms import LibtpmsBackend

        directory = args[0] if args else state_dir
        if directory is None:
            raise ValueError("the libtpms backend needs a state directory (--state-dir)")
        return LibtpmsBackend(directory)
    if kind == "swtpm":
        from .swtpm import SwtpmBackend

        if args[0] == "unix":
            return SwtpmBackend.unix(args[1])
        # The data port is below 65535, so the control port (port + 1) exists.
        return SwtpmBackend.tcp(args[1], int(args[2]))
    from .device import DeviceBackend

    return DeviceBackend(args[0])
