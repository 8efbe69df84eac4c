"""tests/clients: the node's fixtures are tests/frontends' (one freshly served node per module)."""

from tests.frontends.conftest import daemon, inproc, make_daemon, node, tcti  # noqa: F401
