"""Typed errors raised by osd-fl.

Both derive from :class:`ValueError` so that callers that already catch
``ValueError`` keep working; catch the specific type to tell a bad payload
(from the wire) from a bad configuration (from the user).
"""

from __future__ import annotations

__all__ = ["ConfigError", "OSDError", "PayloadError"]


class OSDError(ValueError):
    """Base class of every error osd-fl raises on purpose."""


class PayloadError(OSDError):
    """A payload (bytes from the wire) is malformed, inconsistent or hostile.

    The message names the field that failed and what was expected, e.g.
    ``"tensor 'fc.weight': shape (3, 4) does not match the model's (4, 4)"``.
    """


class ConfigError(OSDError):
    """A compression setting is invalid; the message says which and why."""
