"""Typed errors raised by osd-fl.

All derive from :class:`ValueError` so that callers that already catch
``ValueError`` keep working; catch the specific type to tell a bad payload
(from the wire or a hand-built :class:`~osd_fl.payload.Payload`), a bad
configuration (a setting) and a bad input (the update or importance maps
given to :func:`osd_fl.compress`) apart.
"""

from __future__ import annotations

__all__ = ["ConfigError", "OSDError", "PayloadError", "UpdateError"]


class OSDError(ValueError):
    """Base class of every error osd-fl raises on purpose."""


class PayloadError(OSDError):
    """A payload (bytes from the wire) is malformed, inconsistent or hostile.

    The message names the field that failed and what was expected, e.g.
    ``"tensor 'fc.weight': shape (3, 4) does not match the model's (4, 4)"``.
    """


class ConfigError(OSDError):
    """A compression setting is invalid; the message says which and why."""


class UpdateError(OSDError, ValueError):
    """An input to :func:`osd_fl.compress` (the update or its importance maps) is unusable.

    Empty, not a floating tensor, NaN/Inf, or an importance map of the wrong
    shape or sign; the message names the tensor.
    """
