"""Counters for `cusetpm status`: bumped on the hot path, read by the control socket.

Only increments and one deque append per command; percentiles are computed when read.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

SAMPLES = 1024  # latencies kept per command code (the most recent)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


@dataclass
class Counters:
    started: float = field(default_factory=time.time)
    commands: int = 0
    by_code: Counter[int] = field(default_factory=Counter)
    latency: dict[int, deque[float]] = field(default_factory=dict)

    def command(self, code: int, seconds: float) -> None:
        self.commands += 1
        self.by_code[code] += 1
        samples = self.latency.get(code)
        if samples is None:
            samples = self.latency[code] = deque(maxlen=SAMPLES)
        samples.append(seconds)

    def per_code(self) -> dict[int, tuple[int, float, float]]:
        """count, p50 and p99 in seconds, per command code."""
        out = {}
        for code, count in list(self.by_code.items()):
            values = list(self.latency.get(code, ()))
            out[code] = (count, percentile(values, 0.50), percentile(values, 0.99))
        return out
