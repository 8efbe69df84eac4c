"""tests/frontends' node tests on cusetpm's CUSE node over a kernel TPM chip.

The same test functions test_frontends_on_cuse.py runs on the libtpms-backed node, here
on ``device_daemon``: /dev/tpmrm45 served with ``--backend device:/dev/tpmN``, where
/dev/tpmN is a kernel TPM chip (swtpm behind tpm_vtpm_proxy) -- what a machine with a
hardware TPM runs.  File semantics and the tpm2-tools flows; left out (NOT_ON_DEVICE),
besides what test_frontends_on_cuse.py leaves out, the cases whose cost buys nothing
more on this backend (each still runs on the libtpms node in the guest).
"""

from __future__ import annotations

import pytest

from tests.frontends import test_clients as _clients
from tests.frontends import test_semantics as _semantics
from tests.vm.guest.adopt import adopt
from tests.vm.guest.conftest import CuseDaemon
from tests.vm.guest.test_frontends_on_cuse import NOT_ON_CUSE

NOT_ON_DEVICE = {
    **NOT_ON_CUSE,
    # A race between the CUSE layer's read completion and the next write, looped for
    # ~100 s under TCG; the backend is not part of it.
    "test_next_write_right_after_read_is_never_ebusy": "frontend race loop, on libtpms",
}

ADOPTED: tuple[str, ...] = tuple(
    name for module in (_semantics, _clients) for name in adopt(module, globals(), NOT_ON_DEVICE)
)


@pytest.fixture(scope="module")
def node(device_daemon: CuseDaemon) -> str:
    return device_daemon.path


@pytest.fixture(scope="module")
def tcti(node: str) -> str:
    return f"device:{node}"
