"""Keep the guest-only tests out of the host's collection.

``make test`` collects all of ``tests/``; the tests in ``tests/vm/guest`` need
/dev/cuse and root in the guest kernel, so on the host they are collected only
through ``tests/test_vm_guest.py``, which boots the guest and runs them there.
"""

from __future__ import annotations

import os

collect_ignore_glob: list[str] = [] if os.environ.get("CUSETPM_VM_GUEST") == "1" else ["guest/*"]
