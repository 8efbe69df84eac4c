"""Guest-kernel tests: CUSE end to end inside Debian's kernel under qemu.

Run: ``make test-vm`` (or ``.venv/bin/python -m tests.vm.harness [pytest args]``);
``make test`` runs the same suite through ``tests/test_vm_guest.py``.

* ``harness.py``   boots /boot/vmlinuz-* with virtme-ng, one boot per run
  (``run_in_guest`` for any script, ``run_guest_suite`` for pytest);
* ``guest_run.sh`` the guest side: ``modprobe cuse``, then pytest, results in the rwdir;
* ``guest/``       tests collected only inside the guest; fixtures ``kernel_tpmrm``
  (the kernel's /dev/tpmrmN on swtpm) and ``cusetpm_cuse_node`` (cusetpm over CUSE).

The guest runs the working tree as it is on the host (read-only over 9p),
uncommitted edits included.  Env: CUSETPM_VM_KERNEL (another vmlinuz),
CUSETPM_VM_VERBOSE=1 (kernel messages on the console), CUSETPM_VM_KVM=1.
"""
