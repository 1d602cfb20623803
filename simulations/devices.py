"""Device, thread and seed scoping shared by the tasks and the benchmarks (imports torch only).

The apps run inside other people's processes (a test runner, a notebook, a
Flower simulation worker), so they never leave process-wide torch state
changed: :func:`torch_threads` and :func:`seeded` set it for a block and put
it back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["resolve_device", "seeded", "torch_threads"]


def resolve_device(device: str) -> torch.device:
    """Turn ``"auto"`` into ``cuda`` when available, else ``cpu``.

    Parameters
    ----------
    device
        ``"auto"`` or any string :class:`torch.device` accepts.

    Returns
    -------
    torch.device
        The device to use.

    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, then restore the previous count.

    Parameters
    ----------
    threads
        Intra-op threads for the block; ``None`` or ``0`` leaves the count alone.
        One per client is advised when clients run in parallel on a small CPU.
    """
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block on torch's global CPU generator seeded with ``seed``, then restore its state.

    Code that draws from the global generator without a ``torch.Generator``
    (``nn.Linear``'s initialisation, dropout) becomes reproducible inside the
    block and leaves the caller's random stream as it was. ``None`` forks
    the state without seeding (the block's draws still do not leak out).
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        yield
