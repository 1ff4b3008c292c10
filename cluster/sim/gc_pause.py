"""The cyclic garbage collector paused for a block that builds millions of small objects."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """Run the block with the cyclic collector off (as it was afterwards). A simulated run allocates millions
    of small acyclic objects (requests, batches, results, events): the collector's passes over them cost a
    quarter of a run, and half of building a million-request workload, and free nothing."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
