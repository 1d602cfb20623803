"""osd-fl: OSD (Optimal Singular Damage) compression of federated model updates.

>>> import torch
>>> from osd_fl import compress, decompress
>>> update = {"fc.weight": torch.randn(64, 32), "fc.bias": torch.randn(64)}
>>> blob = compress(update, method="osd", rank=2)
>>> restored = decompress(blob)
>>> sorted(restored)
['fc.bias', 'fc.weight']
"""

from osd_fl.api import compress, decompress, describe, payload_budget, resolve_config
from osd_fl.codec import decode, encode
from osd_fl.compressor import REGISTRY, Compressor, CompressorState, get_compressor, register
from osd_fl.config import CompressionConfig
from osd_fl.errors import ConfigError, OSDError, PayloadError
from osd_fl.feedback import ErrorFeedback
from osd_fl.importance import compute_importance

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "CompressionConfig",
    "Compressor",
    "CompressorState",
    "ConfigError",
    "ErrorFeedback",
    "OSDError",
    "PayloadError",
    "compress",
    "compute_importance",
    "decode",
    "decompress",
    "describe",
    "encode",
    "get_compressor",
    "payload_budget",
    "register",
    "resolve_config",
]
