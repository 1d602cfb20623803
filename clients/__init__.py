"""Flower ClientApp side of osd-fl: the compression mod and the importance hand-off.

Two added lines turn an existing Flower ClientApp into one that uploads
OSD-compressed updates::

    from clients import osd_mod
    app = ClientApp(mods=[osd_mod])

Pair it with :class:`strategies.OSDStrategy` on the ServerApp.
"""

from clients.importance import attach_importance
from clients.mod import make_osd_mod, osd_mod, read_compression_config

__all__ = ["attach_importance", "make_osd_mod", "osd_mod", "read_compression_config"]
