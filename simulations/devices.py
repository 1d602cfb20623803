"""Device selection shared by the tasks and the benchmarks (imports torch only, so benchmark children start fast)."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


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
