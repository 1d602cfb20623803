"""Shared test settings: offline, deterministic, and no test may leave process-global state changed.

Options (used by ``.ci/run`` for its second pass of the default suite):

``--test-order {file,reverse,random}``
    Run the collected tests in file order (default), reversed, or shuffled
    with ``--test-order-seed`` (printed in the header, so a failing order can
    be replayed).
``--torch-threads N``
    Set ``torch.set_num_threads(N)`` for the whole session (restored at the
    end); every test then runs with that count.

The autouse fixture :func:`_no_global_state_leaks` snapshots the state that
one test could change for all later ones (torch's intra-op thread count,
default dtype, deterministic-algorithms flag, grad mode, torch's, NumPy's and
Python's global random generators, the levels of every configured logger,
``os.environ``) and fails the test that leaves any of it changed.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import sklearn  # noqa: F401  (sets KMP_* environment variables on import: once, before any test's snapshot)
import torch
import torch._dynamo  # (the first optimizer imports it, and it sets TORCHINDUCTOR_CACHE_DIR: once, here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("osd-fl")
    group.addoption("--test-order", choices=("file", "reverse", "random"), default="file", help="order of the tests")
    group.addoption("--test-order-seed", type=int, default=None, help="seed of --test-order=random (default: random)")
    group.addoption("--torch-threads", type=int, default=0, help="torch intra-op threads for the session (0 = leave)")


_SEED_KEY = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    seed = config.getoption("--test-order-seed")
    config.stash[_SEED_KEY] = int(seed) if seed is not None else random.SystemRandom().randrange(2**31)


def pytest_report_header(config: pytest.Config) -> list[str]:
    order = config.getoption("--test-order")
    extra = f" (--test-order-seed={config.stash[_SEED_KEY]})" if order == "random" else ""
    threads = config.getoption("--torch-threads") or torch.get_num_threads()
    return [f"osd-fl: test order {order}{extra}, torch threads {threads}"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = config.getoption("--test-order")
    if order == "reverse":
        items.reverse()
    elif order == "random":
        random.Random(config.stash[_SEED_KEY]).shuffle(items)


@pytest.fixture(scope="session", autouse=True)
def _session_threads(pytestconfig: pytest.Config) -> Iterator[None]:
    threads = int(pytestconfig.getoption("--torch-threads") or 0)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    yield
    torch.set_num_threads(before)


def _logger_levels() -> dict[str, int]:
    levels = {"": logging.getLogger().level}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            levels[name] = logger.level
    return levels


def global_state() -> dict[str, Any]:
    """The process-global state a test must leave as it found it."""
    return {
        "torch threads": torch.get_num_threads(),
        "torch default dtype": torch.get_default_dtype(),
        "torch deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
        "torch grad mode": torch.is_grad_enabled(),
        "torch global RNG": torch.random.get_rng_state(),
        "numpy global RNG": np.random.get_state(),  # noqa: NPY002
        "python random": random.getstate(),
        "logger levels": _logger_levels(),
        "environment": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},  # pytest's own
    }


def _differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, old in before.items():
        new = after[key]
        if key == "torch global RNG":
            same = torch.equal(old, new)
        elif key == "numpy global RNG":
            same = old[0] == new[0] and np.array_equal(old[1], new[1]) and tuple(old[2:]) == tuple(new[2:])
        elif key == "logger levels":
            # a logger created during the test starts at NOTSET (0): only changed levels count
            changed = {n: (old.get(n, 0), lvl) for n, lvl in new.items() if old.get(n, 0) != lvl}
            same = not changed
            if not same:
                out.append(f"logger levels changed: {changed}")
            continue
        elif key == "environment":
            changed_env = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            same = not changed_env
            if not same:
                out.append(f"environment variables changed: {changed_env}")
            continue
        else:
            same = old == new
        if not same:
            detail = "" if key.endswith("RNG") or key == "python random" else f": {old} -> {new}"
            out.append(f"{key} changed{detail}")
    return out


@pytest.fixture
def global_rng() -> Iterator[None]:
    """For test code that draws from the global generators (``torch.randn`` without a generator,
    ``nn.Linear`` init, dropout): seeds torch's, NumPy's and Python's with 0 and restores them after."""
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)  # noqa: NPY002
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002


@pytest.fixture
def isolated_engine() -> Iterator[None]:
    """For tests that run a third-party engine in this process (Flower's ``run_simulation`` starts
    Ray, which sets environment variables and logger levels): restores both afterwards."""
    env = dict(os.environ)
    levels = _logger_levels()
    py_state = random.getstate()
    try:
        yield
    finally:
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)
        for name, level in _logger_levels().items():
            if levels.get(name, logging.NOTSET) != level:
                (logging.getLogger(name) if name else logging.getLogger()).setLevel(levels.get(name, logging.NOTSET))
        random.setstate(py_state)


@pytest.fixture(autouse=True)
def _no_global_state_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    before = global_state()
    yield
    problems = _differences(before, global_state())
    if problems:
        pytest.fail(f"{request.node.nodeid} left process-global state changed: " + "; ".join(problems), pytrace=False)
