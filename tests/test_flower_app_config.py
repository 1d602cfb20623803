"""pyproject's Flower app sections: valid for Flower, complete, and in sync with the dataclasses."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.clientapp import ClientApp
from flwr.common.config import (
    flatten_dict,
    get_fused_config_from_dir,
    get_project_config,
    parse_config_args,
    validate_config,
)
from flwr.serverapp import ServerApp

from osd_fl import CompressionConfig, ConfigError
from simulations.app_config import (
    AppSettings,
    app_config_items,
    app_config_toml,
    compression_from_run_config,
    text_config_from_run_config,
)
from simulations.text import TextTaskConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_is_a_valid_flower_app() -> None:
    config = get_project_config(ROOT)
    ok, errors, _ = validate_config(config, check_module=True, project_dir=ROOT)
    assert ok, errors
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "simulations.server_app:app", "clientapp": "simulations.client_app:app"}


def test_registered_apps_are_wired_to_osd() -> None:
    from simulations.client_app import app as client_app
    from simulations.server_app import app as server_app

    assert isinstance(server_app, ServerApp)
    assert isinstance(client_app, ClientApp)
    assert [getattr(m, "__name__", "") for m in client_app._mods] == ["osd_mod"]  # make_osd_mod(initial_model=...)


def test_app_config_holds_every_setting_and_matches_the_dataclasses() -> None:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        section = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    expected = app_config_items()
    assert flatten_dict(section) == expected, (
        "pyproject's [tool.flwr.app.config] is out of date; regenerate it with\n"
        'python -c "from simulations.app_config import app_config_toml; print(app_config_toml())"'
    )
    assert {k for k in expected if k.startswith("osd.")} == {
        "osd." + f.replace("_", "-") for f in CompressionConfig().to_dict()
    }
    assert {k for k in expected if k.startswith("text.")} == {
        "text." + f.replace("_", "-") for f in TextTaskConfig().to_dict()
    }
    assert section["task"] == "text"  # the text task is the app's default
    assert tomllib.loads(app_config_toml())["tool"]["flwr"]["app"]["config"] == section


def test_run_config_overrides_reach_the_apps() -> None:
    overrides = parse_config_args(
        ["num-server-rounds=5 lr=0.05 osd.rank=2 osd.method='truncsvd' osd.error-feedback=true"]
    )
    run_config = get_fused_config_from_dir(ROOT, overrides)
    settings = AppSettings.from_run_config(run_config)
    assert (settings.num_server_rounds, settings.lr) == (5, 0.05)
    assert settings.hidden == AppSettings().hidden
    compression = compression_from_run_config(run_config)
    assert compression == CompressionConfig().replace(method="truncsvd", rank=2, error_feedback=True)
    text = text_config_from_run_config(
        get_fused_config_from_dir(ROOT, parse_config_args(["text.mode='full' text.max-len=32 text.lr=0.0001"]))
    )
    assert (text.mode, text.max_len, text.lr) == ("full", 32, 1e-4)
    with pytest.raises(ValueError, match="not present"):
        get_fused_config_from_dir(ROOT, parse_config_args(["osd.rnak=2"]))


def test_settings_parse_and_validate() -> None:
    assert AppSettings.from_run_config({}) == AppSettings()
    got = AppSettings.from_run_config({"local-epochs": "3", "central-eval": "false", "lr": 1, "other": "x"})
    assert (got.local_epochs, got.central_eval, got.lr) == (3, False, 1.0)
    with pytest.raises(ConfigError, match="local-epochs"):
        AppSettings.from_run_config({"local-epochs": "three"})
    with pytest.raises(ConfigError, match="fraction-train"):
        AppSettings(fraction_train=0.0)
    with pytest.raises(ConfigError, match="unknown compression option"):
        compression_from_run_config({"osd.rnak": 2})
    with pytest.raises(ConfigError, match="task"):
        AppSettings.from_run_config({"task": "images"})


def test_settings_refuse_a_garbled_boolean_instead_of_reading_it_as_false() -> None:
    with pytest.raises(ConfigError, match="central-eval"):
        AppSettings.from_run_config({"central-eval": "maybe"})
    assert AppSettings.from_run_config({"central-eval": "on"}).central_eval is True
