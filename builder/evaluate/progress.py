"""Evaluation stage: progress of the long phases, and the peak memory of the process.

The library reports each phase (``with progress.phase("FP32 reference: perplexity windows", total=8) as
step: ... step(1)``); what is shown belongs to the caller: :class:`Progress` only logs a line at the start
and end of a phase; the CLI's ``BarProgress`` (:mod:`builder.cli.evaluate`) also draws a tqdm bar.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

logger = logging.getLogger(__name__)

Step = Callable[[int], None]


class Phases(Protocol):
    """Anything that reports phases: ``with progress.phase(desc, total) as step: step(1)``."""

    def phase(self, desc: str, total: int | None = ..., unit: str = ...) -> AbstractContextManager[Step]: ...


class Progress:
    """Logs ``<desc> ...`` when a phase starts and ``<desc>: done in N s`` when it ends."""

    @contextmanager
    def phase(self, desc: str, total: int | None = None, unit: str = "batch") -> Iterator[Step]:
        started = time.perf_counter()
        logger.info("%s ...", desc)
        yield lambda n: None
        logger.info("%s: done in %.1f s", desc, time.perf_counter() - started)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)
