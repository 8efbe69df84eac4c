"""Guest-kernel tests: CUSE end to end inside Debian's kernel under qemu (see harness.py)."""
