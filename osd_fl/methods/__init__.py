"""The built-in compression methods, one module each, registered on import.

======================  ==========================================================
``osd``                 :mod:`osd_fl.methods.osd` (on :mod:`~osd_fl.methods.sparse_lowrank`)
``dense``, ``fp16``     :mod:`osd_fl.methods.dense`
``int8``                :mod:`osd_fl.methods.int8`
``truncsvd``            :mod:`osd_fl.methods.truncsvd`
``magtruncsvd``         :mod:`osd_fl.methods.magtruncsvd` (on the same engine)
``topk``                :mod:`osd_fl.methods.topk`
``powersgd``            :mod:`osd_fl.methods.powersgd`
======================  ==========================================================

Every method is compared with OSD at equal bytes through the same codec.
:data:`BUILTIN` is the explicit list; :mod:`osd_fl` imports this package, so
:data:`osd_fl.REGISTRY` holds all of them as soon as ``osd_fl`` is imported.
"""

from __future__ import annotations

from osd_fl.compressor import Compressor, register
from osd_fl.methods.dense import FP16, Dense
from osd_fl.methods.int8 import Int8
from osd_fl.methods.magtruncsvd import MagTruncSVD
from osd_fl.methods.osd import OSD
from osd_fl.methods.powersgd import PowerSGD
from osd_fl.methods.sparse_lowrank import SparseLowRank
from osd_fl.methods.topk import TopK
from osd_fl.methods.truncsvd import TruncSVD

__all__ = [
    "BUILTIN",
    "FP16",
    "OSD",
    "Dense",
    "Int8",
    "MagTruncSVD",
    "PowerSGD",
    "SparseLowRank",
    "TopK",
    "TruncSVD",
]

#: The built-in methods, in registration order.
BUILTIN: tuple[type[Compressor], ...] = (OSD, Dense, FP16, Int8, TruncSVD, MagTruncSVD, TopK, PowerSGD)

for _method in BUILTIN:
    register(_method)
