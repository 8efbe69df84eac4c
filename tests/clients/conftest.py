"""The node fixtures of tests/frontends (a freshly served FUSE node per module), reused."""

from tests.frontends.conftest import daemon, node, tcti  # noqa: F401
