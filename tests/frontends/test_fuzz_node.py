"""make test's 10,000-command slice of `make fuzz` (bench/fuzz.py): the same clients, guard,
probe and census checks through the FUSE node, with a fixed seed."""

from __future__ import annotations

from bench.fuzz import run
from tests.frontends.conftest import require_fuse


def test_fuzz_slice_through_the_node() -> None:
    require_fuse()
    result = run(total=10_000, clients=3, phase=5_000, seed=0x51CE)
    assert result["findings"] == [], result["findings"]
    assert result["commands"] >= 10_000
    assert result["guard_checked"] > 0 and result["guard_violations"] == 0
    assert all(phase["census_ok"] for phase in result["phases"])
    assert result["refused_errnos"].get("EINVAL", 0) > 100  # the RM really refused things
