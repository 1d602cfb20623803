"""The ServerApp registered in ``pyproject.toml`` (``flwr run .``): FedAvg wrapped in OSDStrategy.

It runs the task named by the ``task`` key (``text`` by default, ``digits``
for the fast test task); every setting comes from ``[tool.flwr.app.config]``
(:mod:`simulations.app_config`) and ``--run-config`` overrides.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from osd_fl import CompressionConfig
from simulations.app_config import AppSettings, compression_from_run_config, text_config_from_run_config
from simulations.digits_server import run_server as run_digits
from simulations.text_fl import run_text_server
from strategies import OSDStrategy

__all__ = ["app", "make_server_app"]


def make_server_app(
    settings: AppSettings | None = None,
    compression: CompressionConfig | None = None,
    on_finish: Callable[[Result, OSDStrategy], None] | None = None,
) -> ServerApp:
    """A ServerApp with fixed settings (default: read them from the run_config).

    ``on_finish(result, strategy)`` is called at the end, e.g. for tests that
    run the app in the same process with ``run_simulation``.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        s = settings if settings is not None else AppSettings.from_run_config(context.run_config)
        c = compression if compression is not None else compression_from_run_config(context.run_config)
        if s.task == "digits":
            result, strategy = run_digits(grid, s, c)
        else:
            result, strategy = run_text_server(grid, s, text_config_from_run_config(context.run_config), c)
        if on_finish is not None:
            on_finish(result, strategy)

    return server_app


app = make_server_app()
