"""cusetpm benchmarks: ``python -m bench [--quick]``.

Each section is a module in SECTIONS with

    TITLE: str
    def run(quick: bool) -> list[dict]

and optionally NOTES: str (Markdown printed under the table), returning one row per
measurement (plain JSON-able values; the keys become the
table's columns, in first-seen order). The runner prints each section as a
Markdown table and writes everything to bench/results/. To add a section, write
the module and add its name here. Benchmarks report; they never assert.
"""

SECTIONS: list[str] = [
    "bench.backends",
    "bench.rm",
    "bench.conformance",
    "bench.node",
    "bench.compare",
    "bench.roundtrip",  # TPM commands per client command (bench/results/roundtrip/latest.md)
    "bench.slowtpm",  # a fixed delay per TPM command (same file)
    "bench.scale",
    "bench.schedule",
    "bench.guest_bench",  # boots the guest kernel; skipped (and says so) with --quick
    "bench.guest_slowtpm",  # the kernel and cusetpm on one delayed chip, in the guest (same)
]
