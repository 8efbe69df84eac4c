"""Run a host test module's tests in the guest: bind its tests and fixtures into a guest module.

The guest modules import the very test functions of tests/frontends and tests/clients (a
case added there runs here too) and override the ``node``/``tcti`` fixtures with a CUSE
node served in the guest.  tests/test_vm_guest.py counts what a guest module binds, so
every adopted test must pass in the guest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest


@pytest.fixture
def _probe() -> None:
    """Only here to learn what type @pytest.fixture makes of a function."""


FIXTURE_TYPE = type(_probe)


def adopt(
    module: object, namespace: dict[str, Any], left_out: Mapping[str, str], prefix: str = ""
) -> list[str]:
    """Bind ``module``'s tests (but those in ``left_out``, name -> why) and fixtures into
    ``namespace`` (a guest module's globals()); return the names the tests are bound to.

    ``prefix`` renames test_X to test_<prefix>X, for guest modules that adopt several
    modules with tests of the same name (pytest names a test by its module attribute).
    """
    adopted = []
    for name, value in vars(module).items():
        if name in left_out:
            continue
        if name.startswith("test_") and callable(value):
            bound = f"test_{prefix}{name.removeprefix('test_')}"
            if bound in namespace:
                raise ValueError(f"adopting {name} of {module!r}: {bound} is taken")
            adopted.append(bound)
            namespace[bound] = value
        elif isinstance(value, FIXTURE_TYPE):
            if name not in namespace:
                namespace[name] = value  # e.g. fd, nbfd, token; never the module's own node
            elif namespace[name] is not value and name not in ("node", "tcti"):
                raise ValueError(f"adopting {module!r}: two fixtures named {name}")
    return adopted
