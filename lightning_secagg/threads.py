"""Run torch's passes over a model with one intra-op thread: the thread trap.

Why: torch parallelises an element-wise pass (a copy, a scaling, ``aminmax``)
over all its intra-op threads, one per core by default. Several peers on one
host (the usual test, tutorial and single-machine deployment) then run
``peers x cores`` threads on ``cores`` cores, and OpenMP's workers spin-wait
between the short regions of a chunked pass: the peers steal each other's
cores and a round collapses (see docs/benchmarks.md, "The thread trap").
The passes of :mod:`lightning_secagg.encoding` are memory-bound and chunked,
so one thread loses little even on an idle host, and nothing when the cores
are shared.

:func:`single_threaded` is the one place that switches: the encoding passes
run under it (as a decorator), nothing else.

Which threads a count applies to depends on torch's backend: with OpenMP
(torch's CPU builds) ``torch.set_num_threads`` sets the *calling thread's*
count (and the default for threads that start later); with the native pool
it is process-wide. So the switch is made and undone by the thread that runs
the pass, around the pass only.

Invariants:

* Inside :func:`single_threaded`, the calling thread's
  ``torch.get_num_threads() == 1``; when it leaves its outermost
  :func:`single_threaded`, the count it had before is restored (unless
  something changed it meanwhile, which is then kept), on exceptions too.
* Re-entrant: the nesting depth is per thread, so overlapping calls from
  several threads never leave 1 behind. (With the process-wide native pool,
  a thread that leaves while another is still inside restores the count for
  both: the other finishes its pass with torch's threads, which costs speed,
  never correctness.)
* Nothing changes when the count already is 1 (the benchmarks' and the
  example's setting): no call to ``set_num_threads`` then.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import torch

_P = ParamSpec("_P")
_R = TypeVar("_R")

_local = threading.local()  # per thread: depth (nesting) and restore (count to put back)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Hold the calling thread's torch intra-op threads at one for the duration (re-entrant)."""
    depth = getattr(_local, "depth", 0)
    if depth == 0:
        before = torch.get_num_threads()
        _local.restore = before if before != 1 else None
        if _local.restore is not None:
            torch.set_num_threads(1)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth
        if depth == 0 and _local.restore is not None:
            if torch.get_num_threads() == 1:  # nobody changed it meanwhile
                torch.set_num_threads(_local.restore)
            _local.restore = None


def single_threaded_pass(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate a pass over a model to run under :func:`single_threaded`."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with single_threaded():
            return fn(*args, **kwargs)

    return wrapper


__all__ = ["single_threaded", "single_threaded_pass"]
