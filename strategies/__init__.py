"""Flower ServerApp side of osd-fl: the strategy wrapper and the byte meter.

::

    from flwr.serverapp.strategy import FedAvg
    from strategies import OSDStrategy
    strategy = OSDStrategy(FedAvg(), config=CompressionConfig(rank=2))

Pair it with :func:`clients.osd_mod` on the ClientApp. :class:`strategies.local_grid.LocalGrid`
runs a ServerApp's strategy against ClientApps in this process (tests, fast sweeps).
"""

from strategies.metering import ByteMeter, ForwardingGrid, MessageSize, MeteredGrid, TrafficRow, message_size
from strategies.osd_strategy import OSDStrategy
from strategies.reporting import FederationStalled, Rejection

__all__ = [
    "ByteMeter",
    "FederationStalled",
    "ForwardingGrid",
    "MessageSize",
    "MeteredGrid",
    "OSDStrategy",
    "Rejection",
    "TrafficRow",
    "message_size",
]
