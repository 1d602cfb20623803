"""A seam for measuring where a compressor spends its time, at no cost when unused.

::

    from osd_fl import timing
    with timing.record() as phases:      # phases: dict[str, float], seconds per phase, accumulated
        compressor.encode_matrix(item, budget, state)

Library code marks its steps with ``with timing.phase("svd"):``. Without an
active :func:`record` a phase is one context-variable lookup and a shared
no-op context manager. On CUDA pass ``sync=torch.cuda.synchronize`` so each
phase waits for the kernels it launched before its clock stops. Recorders
are per context (thread or task), so concurrent measurements do not mix.

Phases marked today: ``SparseLowRank.encode_matrix`` (OSD, MagTruncSVD):
``svd``, ``scores``, ``select``, ``candidates`` (adaptive c's candidate
errors), ``record``; ``TruncSVD.encode_matrix``: ``svd``, ``record``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

__all__ = ["phase", "record"]

_Sync = Callable[[], object]
#: The active recorder of this context: the phase totals and the sync function (or ``None``).
_ACTIVE: ContextVar[tuple[dict[str, float], _Sync | None] | None] = ContextVar("osd_fl_timing", default=None)
_OFF: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


@contextlib.contextmanager
def record(sync: _Sync | None = None) -> Iterator[dict[str, float]]:
    """Collect the seconds of every phase run inside the block, summed per phase name.

    Parameters
    ----------
    sync
        Called before a phase starts and before it ends (e.g.
        ``torch.cuda.synchronize``), so asynchronous work is counted in the
        phase that launched it.

    Yields
    ------
    dict
        ``{phase: seconds}``, filled as phases end (nested phases count in each).
    """
    phases: dict[str, float] = {}
    token = _ACTIVE.set((phases, sync))
    try:
        yield phases
    finally:
        _ACTIVE.reset(token)


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    """Mark the enclosed code as phase ``name`` of the active :func:`record` (a no-op without one)."""
    active = _ACTIVE.get()
    if active is None:
        return _OFF
    return _timed(name, *active)


@contextlib.contextmanager
def _timed(name: str, phases: dict[str, float], sync: _Sync | None) -> Iterator[None]:
    if sync is not None:
        sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        if sync is not None:
            sync()
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
