"""Warnings about refused commands, rate-limited per space.

A hostile or broken client can send a refused command in a loop; one WARNING line each would
fill the log. The first few refusals of a space are logged at WARNING, the rest at DEBUG, and
the space's close reports how many went unlogged.
"""

from __future__ import annotations

import logging
from typing import Any

from cusetpm.rm.space import Space

log = logging.getLogger("cusetpm.rm")

WARN_FIRST = 5  # refusals per space logged at WARNING


def warn(space: Space, message: str, *args: Any) -> None:
    """Log one refusal of `space` ("space N: " is prefixed)."""
    space.refusals += 1
    if space.refusals <= WARN_FIRST:
        log.warning("space %d: " + message, space.id, *args)
        if space.refusals == WARN_FIRST:
            log.warning(
                "space %d: %d refusals; more are counted and reported at close",
                space.id, WARN_FIRST,
            )
    elif log.isEnabledFor(logging.DEBUG):
        log.debug("space %d: " + message, space.id, *args)


def report_at_close(space: Space) -> None:
    unlogged = space.refusals - WARN_FIRST
    if unlogged > 0:
        log.warning("space %d closed: %d more refusals were not logged", space.id, unlogged)
