"""cusetpm benchmarks: ``python -m bench [--quick]``.

Each section is a module in SECTIONS with

    TITLE: str
    def run(quick: bool) -> list[dict]

returning one row per measurement (plain JSON-able values; the keys become the
table's columns, in first-seen order). The runner prints each section as a
Markdown table and writes everything to bench/results/. To add a section, write
the module and add its name here. Benchmarks report; they never assert.
"""

SECTIONS: list[str] = [
    "bench.backends",
    "bench.rm",
]
