"""Ranges shared by the helper scripts' count flags, declared with the flag (``engine.cli.number``): a count
outside is refused in one line when the command line is read, before anything starts. Without a bound a typo
(``--workers 100000``) starts that many processes and hangs the machine instead of failing.
"""
from __future__ import annotations

import os

from engine.cli import number

CPUS = os.cpu_count() or 1
MAX_PROCESSES = max(256, 8 * CPUS)    # processes or threads started at once: 8 per core is already far past any gain


def process_count(what: str, at_least: int = 0):
    """An argparse ``type``: how many processes or threads (``what``, e.g. "decoding processes") to start at once,
    ``at_least`` .. :data:`MAX_PROCESSES`."""
    return number(int, at_least=at_least, at_most=MAX_PROCESSES,
                  why=f"{what} started at once: the bound is 8 per CPU core ({CPUS} here), at least 256")
