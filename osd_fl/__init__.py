"""osd-fl: OSD (Optimal Singular Damage) compression of federated model updates.

>>> import torch
>>> from osd_fl import compress, decompress
>>> update = {"fc.weight": torch.randn(64, 32), "fc.bias": torch.randn(64)}
>>> blob = compress(update, method="osd", rank=2)
>>> restored = decompress(blob)
>>> sorted(restored)
['fc.bias', 'fc.weight']
"""

import osd_fl.methods  # noqa: F401  (registers the built-in methods: REGISTRY is full on import)
from osd_fl.api import compress, decompress, describe, payload_budget, payload_limit, resolve_config
from osd_fl.checks import check_conformance, exceeds, record_sq_norm, value_limit
from osd_fl.codec import decode, encode, iter_tensors, reconstruct
from osd_fl.compressor import REGISTRY, Compressor, CompressorState, get_compressor, methods_with, register
from osd_fl.config import CompressionConfig
from osd_fl.errors import ConfigError, OSDError, PayloadError, UpdateError
from osd_fl.feedback import ErrorFeedback
from osd_fl.importance import compute_importance
from osd_fl.payload import Kind, Payload, Section, TensorRecord
from osd_fl.sizes import record_bytes, total_dense_bytes

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "CompressionConfig",
    "Compressor",
    "CompressorState",
    "ConfigError",
    "ErrorFeedback",
    "Kind",
    "OSDError",
    "Payload",
    "PayloadError",
    "Section",
    "TensorRecord",
    "UpdateError",
    "check_conformance",
    "compress",
    "compute_importance",
    "decode",
    "decompress",
    "describe",
    "encode",
    "exceeds",
    "get_compressor",
    "iter_tensors",
    "methods_with",
    "payload_budget",
    "payload_limit",
    "reconstruct",
    "record_bytes",
    "record_sq_norm",
    "register",
    "resolve_config",
    "total_dense_bytes",
    "value_limit",
]
