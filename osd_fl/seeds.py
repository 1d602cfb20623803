"""Seeds derived from one configured seed, so the same seed gives the same bytes.

Every random choice of osd-fl draws from a :class:`torch.Generator` seeded
here: a tensor's seed mixes the configured seed with the tensor's name, a
client's seed (simulations) with its partition and the round. Both use the
same mixing constant and stay below ``2**63`` (torch seeds are 64-bit).
"""

from __future__ import annotations

import zlib

__all__ = ["client_seed", "item_seed"]

#: Multiplier of the configured seed (a prime, so different seeds stay apart).
_MIX = 1_000_003
#: Multiplier of a client's partition id in :func:`client_seed`.
_PARTITION_MIX = 7919
_MOD = 2**63


def item_seed(seed: int, name: str) -> int:
    """Seed of the random choices made for the tensor ``name`` (randomized SVD sketch, PowerSGD start)."""
    return (seed * _MIX + zlib.crc32(name.encode())) % _MOD


def client_seed(seed: int, partition: int, server_round: int) -> int:
    """Seed of one client's local training in one round."""
    return (seed * _MIX + partition * _PARTITION_MIX + server_round) % _MOD
