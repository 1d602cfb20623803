"""Error feedback: send what was left out later.

The client keeps a residual ``e`` per tensor, compresses ``dW + e`` instead
of ``dW``, and keeps ``e <- dW + e - dW_hat``. Over rounds the sent updates
plus the final residual add up exactly to the true updates (telescoping), so
nothing is lost, only delayed. In Flower keep it in ``context.state`` via
:meth:`ErrorFeedback.to_numpy` / :meth:`ErrorFeedback.from_numpy`.

A client whose residual was lost (a restarted SuperNode) starts again from
``e = 0``: it loses the not-yet-sent part of its past updates, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["ErrorFeedback"]


@dataclass
class ErrorFeedback:
    """Residuals ``e`` per tensor name (float32)."""

    residuals: dict[str, torch.Tensor] = field(default_factory=dict)

    def corrected(self, update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``dW + e`` for every tensor of ``update`` (float32).

        A residual whose shape no longer matches its tensor is dropped.
        """
        out: dict[str, torch.Tensor] = {}
        for name, t in update.items():
            t32 = t.detach().to(torch.float32)
            e = self.residuals.get(name)
            if e is not None and e.shape == t32.shape:
                t32 = t32 + e.to(t32.device)
            out[name] = t32
        return out

    def update(self, corrected: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> None:
        """Keep ``e <- (dW + e) - dW_hat`` for every tensor."""
        self.residuals = {name: (c - sent[name].to(c.device, torch.float32)).detach() for name, c in corrected.items()}

    def to_numpy(self) -> dict[str, npt.NDArray[np.float32]]:
        """Residuals as float32 arrays (e.g. for a Flower ``ArrayRecord``)."""
        return {k: v.detach().cpu().to(torch.float32).numpy() for k, v in self.residuals.items()}

    @classmethod
    def from_numpy(cls, arrays: Mapping[str, npt.NDArray[np.floating]]) -> ErrorFeedback:
        """Inverse of :meth:`to_numpy`."""
        return cls({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()})

    def norm(self) -> float:
        """Frobenius norm of all residuals together."""
        return float(sum(float(r.double().square().sum()) for r in self.residuals.values()) ** 0.5)
