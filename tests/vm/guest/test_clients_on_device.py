"""tests/clients in the guest: the programs people run, through cusetpm's CUSE node over a
kernel TPM chip.

The very test functions of tests/clients (on the host they run through a FUSE node on
libtpms), here on ``device_daemon``: /dev/tpmrm45 served with ``--backend
device:/dev/tpmN`` -- the node a machine with a hardware TPM gives its programs.  The
programs are the host's Debian packages, which the guest sees through its shared root
(tpm2-openssl, clevis, systemd-creds, tpm2-pkcs11's tpm2_ptool and OpenSC's pkcs11-tool,
tpm2-pytss in this interpreter); the Makefile installs them (`make client-deps`), and a
missing one fails its test with the program's name.

Left out (NOT_ON_DEVICE) and run on the host only, each with why.
"""

from __future__ import annotations

import pytest

from tests.clients import test_clevis as _clevis
from tests.clients import test_systemd_creds as _systemd_creds
from tests.clients import test_tpm2_openssl as _tpm2_openssl
from tests.clients import test_tpm2_pkcs11 as _tpm2_pkcs11
from tests.clients import test_tpm2_pytss as _tpm2_pytss
from tests.vm.guest.adopt import adopt
from tests.vm.guest.conftest import CuseDaemon

NOT_ON_DEVICE: dict[str, str] = {}

# Bound as test_<program>_<test> (clevis and systemd-creds both have a test of one name).
ADOPTED: tuple[str, ...] = tuple(
    name
    for prefix, module in (("tpm2_openssl_", _tpm2_openssl), ("clevis_", _clevis),
                           ("systemd_creds_", _systemd_creds), ("tpm2_pkcs11_", _tpm2_pkcs11),
                           ("tpm2_pytss_", _tpm2_pytss))
    for name in adopt(module, globals(), NOT_ON_DEVICE, prefix)
)


@pytest.fixture(scope="module")
def node(device_daemon: CuseDaemon) -> str:
    return device_daemon.path


@pytest.fixture(scope="module")
def tcti(node: str) -> str:
    return f"device:{node}"
