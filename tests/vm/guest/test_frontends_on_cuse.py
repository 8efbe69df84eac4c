"""tests/frontends' node tests, run on the CUSE node the kernel really makes.

On the host these tests run on a FUSE node (the host kernel has no CUSE), serving the
same file operations.  Here the very same test functions -- imported, not copied, so
a case added there runs here too -- run on the shared ``cusetpm serve --name tpmrm42``
(tests/vm/guest/conftest.py): the kernel-semantics cases of test_semantics.py, the
tpm2-tools client cases of test_clients.py and the kernel's own selftests
(test_kselftest.py).  This is what ``CUSETPM_TEST_NODE=/dev/...
pytest tests/frontends/test_semantics.py tests/frontends/test_clients.py`` does, inside
the one pytest run the guest can afford.

Left out here (see NOT_ON_CUSE), each run on the host instead:

* test_node_attributes checks a FUSE mount's directory (its ``daemon`` fixture starts a
  FUSE daemon); the CUSE node's attributes are test_cusetpm_cuse.py's.
* the tpm2-pytss cases start a Python that imports tpm2_pytss for each client: ~40 s
  apiece under TCG, 8 at once in test_eight_client_processes_at_once.  They exercise the
  RM and the file operations, which the host covers on FUSE; tpm2-tools (C) is the
  client that reaches the CUSE node here.

tests/test_vm_guest.py fails unless every one of them passed.  The same tests on the
device backend (a kernel TPM chip behind cusetpm) are test_frontends_on_device.py's.
"""

from __future__ import annotations

import pytest

from tests.frontends import test_clients as _clients
from tests.frontends import test_kselftest as _kselftest
from tests.frontends import test_semantics as _semantics
from tests.vm.guest.adopt import adopt

NOT_ON_CUSE = {
    "test_node_attributes": "a FUSE mount's attributes",
    "test_tpm2_pytss_hmac_session_with_parameter_encryption": "tpm2_pytss costs ~40 s a client",
    "test_eight_client_processes_at_once": "8 tpm2_pytss clients cost minutes under TCG",
}


# Test function names (parametrized ones once); tests/test_vm_guest.py requires them all.
ADOPTED: tuple[str, ...] = tuple(
    name for module in (_semantics, _clients, _kselftest)
    for name in adopt(module, globals(), NOT_ON_CUSE)
)


@pytest.fixture(scope="module")
def node(cusetpm_cuse_node: str) -> str:
    """What tests/frontends/conftest.py's ``node`` gives with CUSETPM_TEST_NODE set."""
    return cusetpm_cuse_node


@pytest.fixture(scope="module")
def tcti(node: str) -> str:
    return f"device:{node}"
