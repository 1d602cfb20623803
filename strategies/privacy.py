"""Server side of osd-fl with Flower's differential-privacy wrappers: what composes, and in which order.

:class:`~strategies.OSDStrategy` decodes every client's compressed update and
hands its inner strategy ONE synthetic reply, ``W + avg(dW)`` with the total
weight. Of Flower's DP wrappers only client-side fixed clipping stays correct
behind that, and only inside the decoder::

    OSDStrategy(DifferentialPrivacyClientSideFixedClipping(FedAvg(...), noise_multiplier,
                                                          clipping_norm, num_sampled_clients))

with ``fixedclipping_mod`` inside ``osd_mod`` on the clients
(:mod:`clients.privacy`). The clients clip the dense update before it is
compressed; the wrapper adds its noise, ``N(0, (noise_multiplier *
clipping_norm / num_sampled_clients)**2)`` per value, to the decoded mean,
as Flower does to FedAvg's.

:func:`check_inner_strategy_privacy` refuses, with the reason and what works
instead, what cannot be correct behind one synthetic reply:

* server-side clipping (fixed or adaptive): it would clip the *average*, not
  each client's update, so one client's influence is not bounded by the
  clipping norm the noise is calibrated for;
* client-side adaptive clipping: it counts the clipped clients from each
  reply's ``norm_bit``; one reply carries their weighted mean, so the clipped
  fraction it adapts to is 0 or 1;
* an accountant on the fixed-clipping wrapper: accounted mode requires one
  reply per sampled client and would skip every round;
* ``error_feedback=True`` with client-side clipping: the residual is added
  after clipping, so what a client sends can exceed the clipping norm.

:func:`check_train_config_privacy` catches the opposite order on the server,
``DifferentialPrivacyClientSide...(OSDStrategy(...))``: the wrapper's
``clipping_norm`` is already in the train config when OSDStrategy sees it,
through a grid that OSDStrategy's ``start`` did not meter.
``DifferentialPrivacyServerSide...(OSDStrategy(...))`` leaves no trace there;
it fails in its own ``aggregate_train`` with Flower's ``TypeError:
Unsupported serialization type for numpy conversion: 'osd-fl.payload'``
(it clips every reply's arrays, and the reply holds the payload).
"""

from __future__ import annotations

from collections.abc import Iterator

from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from osd_fl import CompressionConfig, ConfigError
from strategies.metering import MeteredGrid

__all__ = ["KEY_CLIPPING_NORM", "SUPPORTED_DP", "check_inner_strategy_privacy", "check_train_config_privacy"]

KEY_CLIPPING_NORM = "clipping_norm"
"""The train-config key Flower's client-side DP wrappers send (``flwr``'s own ``KEY_CLIPPING_NORM``)."""

SUPPORTED_DP = (
    "clip on the clients, inside the compression mod: ClientApp(mods=[osd_mod]) with "
    "@app.train(mods=[fixedclipping_mod]) (or LocalDpMod), and on the server "
    "OSDStrategy(DifferentialPrivacyClientSideFixedClipping(FedAvg(...), noise_multiplier, clipping_norm, "
    "num_sampled_clients), config=...)"
)
"""The supported composition, as the error messages state it."""

_SERVER_SIDE = (DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping)
_CLIENT_SIDE = (DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyClientSideAdaptiveClipping)


def _chain(inner: Strategy) -> Iterator[Strategy]:
    """``inner`` and every strategy it wraps (Flower's wrappers keep it in ``.strategy``)."""
    seen: set[int] = set()
    current: object = inner
    while isinstance(current, Strategy) and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "strategy", None)


def check_inner_strategy_privacy(inner: Strategy, config: CompressionConfig | None = None) -> None:
    """Refuse a Flower DP wrapper inside OSDStrategy that would be wrong behind one synthetic reply.

    Parameters
    ----------
    inner
        The strategy :class:`~strategies.OSDStrategy` wraps (nested wrappers
        are followed through their ``strategy`` attribute).
    config
        The compression settings OSDStrategy sends (checks ``error_feedback``).

    Raises
    ------
    osd_fl.ConfigError
        Naming the wrapper, why it cannot work here and what does.
    """
    for strategy in _chain(inner):
        name = type(strategy).__name__
        if isinstance(strategy, _SERVER_SIDE):
            raise ConfigError(
                f"{name} cannot run inside OSDStrategy: OSDStrategy hands its inner strategy the decoded "
                "average of the clients' updates as one reply, so server-side clipping would clip that "
                "average, not each client's update, and the noise would not bound one client's influence. "
                f"Instead, {SUPPORTED_DP}."
            )
        if isinstance(strategy, DifferentialPrivacyClientSideAdaptiveClipping):
            raise ConfigError(
                f"{name} cannot run inside OSDStrategy: it adapts the clipping norm to the fraction of "
                "clients whose update was clipped (each reply's 'norm_bit'), but OSDStrategy hands it one "
                "reply carrying their mean, so that fraction would be 0 or 1. Use fixed clipping: "
                f"{SUPPORTED_DP}."
            )
        if isinstance(strategy, DifferentialPrivacyClientSideFixedClipping):
            if getattr(strategy, "accountant", None) is not None:
                raise ConfigError(
                    f"{name}(accountant=...) cannot run inside OSDStrategy: accounted mode requires one "
                    "reply per sampled client, and OSDStrategy hands it one reply (the decoded mean), so "
                    "every round would be skipped. Pass accountant=None and account for the privacy spent "
                    "yourself (one Gaussian release per round, noise_multiplier, num_sampled_clients)."
                )
            if config is not None and config.error_feedback:
                raise ConfigError(
                    f"error_feedback=True cannot be combined with {name}: the client adds the residual of "
                    "earlier rounds after fixedclipping_mod has clipped the update, so what it sends can "
                    "exceed clipping_norm and the server's noise no longer covers it. Set "
                    "error_feedback=False (with LocalDpMod, which noises on the client, it may stay on)."
                )


def check_train_config_privacy(inner: Strategy, config: ConfigRecord, grid: Grid) -> None:
    """Refuse to run inside a client-side DP wrapper (``DifferentialPrivacyClientSide...(OSDStrategy(...))``).

    Call it at the top of ``OSDStrategy.configure_train``, before the
    ``osd.*`` settings are added: a ``clipping_norm`` already in ``config``
    that no wrapper inside OSDStrategy put there, arriving through a grid
    that ``OSDStrategy.start`` did not wrap, was put there by a DP wrapper
    around OSDStrategy (which also means no byte is metered).

    Raises
    ------
    osd_fl.ConfigError
        Naming the order that works.
    """
    if KEY_CLIPPING_NORM not in config or isinstance(grid, MeteredGrid):
        return
    if any(isinstance(strategy, _CLIENT_SIDE) for strategy in _chain(inner)):
        return  # an inner wrapper set it in an earlier round (Flower reuses the config record)
    raise ConfigError(
        f"the train config already holds {KEY_CLIPPING_NORM!r} when OSDStrategy adds its settings, and "
        "start() was not called on OSDStrategy: OSDStrategy is wrapped by a differential-privacy wrapper. "
        "Put the decoder outermost, OSDStrategy(DifferentialPrivacyClientSideFixedClipping(FedAvg(...), ...)), "
        f"and call start() on it. Supported: {SUPPORTED_DP}."
    )
