"""Run settings of this repository's Flower app (``flwr run .``), the source of every key.

The app runs one of two tasks, chosen by ``task``: ``text`` (the default: a
Hugging Face sequence classifier, MiniLM on Rotten Tomatoes unless
``text.model-path`` / ``text.data-path`` say otherwise) or ``digits`` (a small
MLP on scikit-learn's digits, seconds per round, used by the tests).
``[tool.flwr.app.config]`` in ``pyproject.toml`` holds every field of
:class:`AppSettings` (hyphenated, ``num-server-rounds``), every field of
:class:`~simulations.text.TextTaskConfig` under ``text.`` (``text.mode``) and
every field of :class:`~osd_fl.config.CompressionConfig` under ``osd.``
(``osd.rank``). :func:`app_config_toml` renders that section from the
dataclasses, and a test checks that ``pyproject.toml`` matches it, so they
cannot drift. Override any key at run time::

    flwr run . --run-config "num-server-rounds=5 osd.rank=2 text.mode='full' text.frozen-layers=0"
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from osd_fl import CompressionConfig, ConfigError
from osd_fl.records import CONFIG_PREFIX
from osd_fl.settings import Settings, check_literal_fields, flag_name
from simulations.text.config import TextTaskConfig

__all__ = [
    "TEXT_PREFIX",
    "AppSettings",
    "app_config_items",
    "app_config_toml",
    "compression_from_run_config",
    "text_config_from_run_config",
]

#: Prefix of the text task's keys in the run_config (``text.max-len``).
TEXT_PREFIX = "text."


@dataclass(frozen=True)
class AppSettings(Settings):
    """The federation's settings (both tasks) and the digits task's own; the text task's are ``text.*``."""

    settings_name: ClassVar[str] = "app"

    task: Literal["text", "digits"] = field(
        default="text",
        metadata={
            "help": "Task the app runs: text (settings under text.*; the model and data folders are options) "
            "or digits (the fast MLP the tests use; settings marked 'digits')."
        },
    )
    num_server_rounds: int = field(default=3, metadata={"help": "Federated rounds."})
    fraction_train: float = field(default=1.0, metadata={"help": "Share of connected nodes sampled for training."})
    fraction_evaluate: float = field(
        default=1.0, metadata={"help": "Share of nodes sampled for federated evaluation (0 = none)."}
    )
    min_nodes: int = field(default=2, metadata={"help": "Nodes that must be connected before a round starts."})
    local_epochs: int = field(default=1, metadata={"help": "digits: Local epochs per round on each client."})
    optimizer: str = field(default="sgd", metadata={"help": "digits: Local optimizer: sgd (momentum 0.9) or adam."})
    lr: float = field(default=0.1, metadata={"help": "digits: Local learning rate."})
    batch_size: int = field(default=32, metadata={"help": "digits: Local mini-batch size."})
    hidden: int = field(
        default=128, metadata={"help": "digits: Hidden units of the MLP (the compressed matrix is hidden x 64)."}
    )
    val_fraction: float = field(
        default=0.2, metadata={"help": "digits: Share of each partition kept for local validation."}
    )
    test_fraction: float = field(
        default=0.2, metadata={"help": "digits: Share of the data held out for the server's test set."}
    )
    seed: int = field(default=0, metadata={"help": "digits: Seed of the data split, model init and shuffling."})
    server_lr: float = field(default=1.0, metadata={"help": "Server learning rate: W <- W + server_lr * avg(dW)."})
    max_payload_bytes: int = field(
        default=0, metadata={"help": "Largest payload the server accepts (0 = the method's own budget)."}
    )
    downlink_method: str = field(
        default="",
        metadata={"help": "Compress the broadcast too with this method (e.g. osd); '' = dense, as in Flower."},
    )
    downlink_rank: int = field(default=4, metadata={"help": "Rank of the compressed broadcast."})
    downlink_hold_initial: bool = field(
        default=False,
        metadata={"help": "Nodes already hold the initial model: no dense first download (checked by digest)."},
    )
    central_eval: bool = field(default=True, metadata={"help": "Evaluate the global model on the test set each round."})
    results_dir: str = field(
        default="", metadata={"help": "Folder for traffic.csv, rounds.csv and result.json ('' = do not write)."}
    )
    default_partitions: int = field(
        default=2,
        metadata={"help": "num-partitions to assume when the node config has none (a SuperNode started without it)."},
    )

    def __post_init__(self) -> None:
        """Check ranges; raise :class:`~osd_fl.ConfigError` naming the bad field."""
        if self.num_server_rounds < 1:
            raise ConfigError(f"num-server-rounds={self.num_server_rounds} must be >= 1")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fraction-train={self.fraction_train} must be in (0, 1]")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ConfigError(f"fraction-evaluate={self.fraction_evaluate} must be in [0, 1]")
        check_literal_fields(self)
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer={self.optimizer!r} must be 'sgd' or 'adam'")
        for name in ("min_nodes", "local_epochs", "batch_size", "hidden", "default_partitions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.lr <= 0 or self.server_lr <= 0:
            raise ConfigError("lr and server-lr must be positive")
        if self.downlink_rank < 1:
            raise ConfigError(f"downlink-rank={self.downlink_rank} must be >= 1")
        if self.max_payload_bytes < 0:
            raise ConfigError(f"max-payload-bytes={self.max_payload_bytes} must be >= 0")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> AppSettings:
        """Read the hyphenated keys of a Flower ``run_config`` (others are ignored).

        Missing keys keep their defaults, so ``run_simulation`` (empty
        run_config) gets a working run.
        """
        return cls.from_mapping(run_config, strict=False)


def compression_from_run_config(run_config: Mapping[str, Any]) -> CompressionConfig:
    """The ``osd.*`` keys of a ``run_config`` as a :class:`CompressionConfig` (strict)."""
    return CompressionConfig.from_mapping(run_config, prefix=CONFIG_PREFIX, strict=True)


def text_config_from_run_config(run_config: Mapping[str, Any]) -> TextTaskConfig:
    """The ``text.*`` keys of a ``run_config`` as a :class:`TextTaskConfig` (strict)."""
    return TextTaskConfig.from_mapping(run_config, prefix=TEXT_PREFIX, strict=True)


def app_config_items() -> dict[str, Any]:
    """Every ``[tool.flwr.app.config]`` key with its default, in order."""
    items: dict[str, Any] = {}
    for name, value in AppSettings().to_dict().items():
        items[flag_name(name)] = value
    for name, value in TextTaskConfig().to_dict().items():
        items[flag_name(name, TEXT_PREFIX)] = value
    for name, value in CompressionConfig().to_dict().items():
        items[flag_name(name, CONFIG_PREFIX)] = value
    return items


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def app_config_toml() -> str:
    """The ``[tool.flwr.app.config]`` section, with each setting's help as a comment."""
    helps = {flag_name(k): v for k, v in AppSettings.help().items()}
    helps.update({flag_name(k, TEXT_PREFIX): v for k, v in TextTaskConfig.help().items()})
    helps.update({flag_name(k, CONFIG_PREFIX): v for k, v in CompressionConfig.help().items()})
    lines = ["[tool.flwr.app.config]"]
    for key, value in app_config_items().items():
        lines.append(f"# {helps[key]}")
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
