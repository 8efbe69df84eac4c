"""Fixtures for resource-manager tests: an RM over libtpms in process (a real TPM)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cusetpm.backends.libtpms import LibtpmsBackend
from cusetpm.rm import ResourceManager, RMConfig
from tests.rm.client import RawClient

RMFactory = Callable[..., ResourceManager]

# CUSETPM_TEST_SCHEDULE=fifo runs the RM tests in the other schedule (fair is the default):
# `fifo` must behave exactly as before fair scheduling existed. test_scheduling.py names its
# schedule itself and is left out of such a run.
TEST_SCHEDULE = os.environ.get("CUSETPM_TEST_SCHEDULE")

# Every RM test runs in both residency modes (rm/residency.py): "resident" (the default: contexts
# stay in the TPM between commands) and "eager" (nothing stays). A test about one mode only
# says so with @pytest.mark.residency("eager") (or "resident") and runs once.
RESIDENCY_MODES = ("resident", "eager")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "residency" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("residency")
    modes = marker.args if marker else RESIDENCY_MODES
    metafunc.parametrize("residency", modes)


@pytest.fixture
def residency(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_rm(tmp_path: Path, residency: str) -> Iterator[RMFactory]:
    """make_rm(config=None, wrap=None): one RM over a fresh libtpms, in the test's residency
    mode; `wrap` may wrap the backend (fault injection). Stopped and closed after the test."""
    made: list[tuple[ResourceManager, LibtpmsBackend]] = []

    def factory(config: RMConfig | None = None, wrap: Callable | None = None) -> ResourceManager:
        assert not made, "libtpms is one TPM per process: one RM per test"
        backend = LibtpmsBackend(tmp_path / "state")
        config = dataclasses.replace(config or RMConfig(), residency=residency)
        if TEST_SCHEDULE:
            config = dataclasses.replace(config, schedule=TEST_SCHEDULE)
        rm = ResourceManager(wrap(backend) if wrap else backend, config)
        made.append((rm, backend))
        rm.start()
        return rm

    yield factory
    for rm, backend in made:
        rm.stop()
        backend.close()


@pytest.fixture
def rm(make_rm: RMFactory) -> ResourceManager:
    return make_rm()


@pytest.fixture
def client(rm: ResourceManager) -> RawClient:
    return RawClient(rm, rm.open_space())


def assert_tpm_empty(rm: ResourceManager) -> None:
    """Nothing of any space is left in the TPM (census at the TPM, not through a space)."""
    census = rm.tpm_census()
    assert census == {"transient": [], "loaded_sessions": [], "saved_sessions": []}, census
