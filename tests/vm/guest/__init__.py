"""Tests that run only inside the virtme-ng guest (tests/vm/guest_run.sh sets CUSETPM_VM_GUEST)."""
