"""The Flower way, end to end (slow): ``flwr run .`` in simulation and a real loopback deployment.

Each test starts its own SuperLink (and SuperNodes) on free 127.0.0.1 ports
with a private ``FLWR_HOME``, so it cannot collide with another run on the
machine, and stops every process it started, by process group, afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


class Processes:
    """Background processes started by a test, each in its own session (process group)."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                env=self.env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs.append((proc, log))
        return proc

    def stop(self) -> None:
        for proc, _ in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # our own session: the process and its children
        for proc, _ in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def tails(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for _, log in self.procs)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(_env(tmp_path / "flwr_home"), tmp_path)
    (tmp_path / "flwr_home").mkdir()
    try:
        yield procs
    finally:
        procs.stop()


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], procs: Processes, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode}\n{procs.tails()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"nothing listens on 127.0.0.1:{port} after {timeout}s\n{procs.tails()}")


def start_superlink(procs: Processes, tmp_path: Path, *, simulation: bool = False) -> int:
    """Start a SuperLink on a free 127.0.0.1 port (``--simulation`` for ``flwr run`` simulations); return the port."""
    port = _free_port()
    mode = ["--simulation"] if simulation else []
    link = procs.start(
        "superlink",
        "flower-superlink",
        "--insecure",
        *mode,
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(tmp_path / "superlink.db"),
    )
    _wait_for_port(port, link, procs)
    return port


def _write_flower_config(flwr_home: Path, name: str, port: int, options: str = "") -> None:
    text = f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    (flwr_home / "config.toml").write_text(text + options)


def _flwr_run(procs: Processes, connection: str, run_config: str, timeout: float = 420) -> str:
    cmd = [str(BIN / "flwr"), "run", str(ROOT), connection, "--stream", "--run-config", run_config]
    try:
        done = subprocess.run(cmd, env=procs.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else str(exc.stdout)
        pytest.fail(f"flwr run timed out after {timeout}s\n{partial[-5000:]}\n{procs.tails()}")
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{out[-5000:]}\n{procs.tails()}"
    return out


def _check_result(results: Path, rounds: int, nodes: int) -> dict[str, Any]:
    summary: dict[str, Any] = json.loads((results / "result.json").read_text())
    acc = {int(r): m["test-accuracy"] for r, m in summary["central"].items()}
    assert sorted(acc) == list(range(rounds + 1))
    assert acc[rounds] > acc[0] + 0.3, acc
    assert summary["rejections"] == []
    for r in range(1, rounds + 1):
        train = summary["train"][str(r)]
        assert (train["accepted"], train["rejected"], train["failed"]) == (nodes, 0, 0)
    traffic = summary["traffic"]
    assert traffic["messages-down"] == traffic["messages-up"] == 2 * rounds * nodes
    per_round = [summary[p][str(r)] for p in ("train", "evaluate") for r in range(1, rounds + 1)]
    assert sum(m["bytes-up"] for m in per_round) == traffic["bytes-up"]
    assert (results / "traffic.csv").read_text().count("\n") == 1 + rounds * 2 * nodes * 2
    return summary


def test_flwr_run_simulation(processes: Processes, tmp_path: Path) -> None:
    """``flwr run .`` against a simulation SuperLink, with --run-config overrides."""
    port = start_superlink(processes, tmp_path, simulation=True)
    options = "options.num-supernodes = 2\noptions.backend.client-resources.num-cpus = 1\n"
    _write_flower_config(tmp_path / "flwr_home", "sim", port, options)
    results = tmp_path / "results"
    run_config = f"task='digits' num-server-rounds=2 osd.rank=2 osd.method='truncsvd' results-dir='{results}'"
    _flwr_run(processes, "sim", run_config)
    summary = _check_result(results, rounds=2, nodes=2)
    assert summary["settings"]["compression"]["method"] == "truncsvd"  # the override reached the ServerApp
    assert summary["settings"]["compression"]["rank"] == 2


def test_flwr_run_simulation_of_the_text_task(processes: Processes, tmp_path: Path) -> None:
    """``flwr run .`` with the app's default task (text): full-model MiniLM, OSD uploads, a tiny run."""
    port = start_superlink(processes, tmp_path, simulation=True)
    options = "options.num-supernodes = 2\noptions.backend.client-resources.num-cpus = 1\n"
    _write_flower_config(tmp_path / "flwr_home", "sim", port, options)
    results = tmp_path / "results"
    _flwr_run(
        processes,
        "sim",
        "num-server-rounds=1 osd.rank=1 text.mode='full' text.frozen-layers=0 text.max-examples=160 "
        f"text.test-size=40 text.max-len=24 text.local-steps=1 text.batch-size=8 results-dir='{results}'",
    )
    summary: dict[str, Any] = json.loads((results / "result.json").read_text())
    assert summary["settings"]["task"] == "text"
    assert summary["settings"]["text"]["mode"] == "full"
    train = summary["train"]["1"]
    assert (train["accepted"], train["rejected"], train["failed"]) == (2, 0, 0)
    assert summary["rejections"] == []
    assert 0.0 <= summary["central"]["1"]["test-accuracy"] <= 1.0
    # MiniLM's float32 weights are ~90 MB; two rank-1 OSD replies are a small fraction of one
    assert train["bytes-up"] < 90e6 / 20


def test_deployment_on_loopback(processes: Processes, tmp_path: Path) -> None:
    """A SuperLink and two SuperNodes on 127.0.0.1; every ClientApp call is a fresh process."""
    port = start_superlink(processes, tmp_path)
    for i in range(2):
        processes.start(
            f"supernode{i}",
            "flower-supernode",
            "--insecure",
            "--superlink",
            f"127.0.0.1:{port}",
            "--port",
            str(_free_port()),
            "--node-config",
            f"partition-id={i} num-partitions=2",
        )
    _write_flower_config(tmp_path / "flwr_home", "deploy", port)
    results = tmp_path / "results"
    _flwr_run(processes, "deploy", f"task='digits' num-server-rounds=2 osd.error-feedback=true results-dir='{results}'")
    summary = _check_result(results, rounds=2, nodes=2)
    # context.state survived between rounds although each round ran in a new ClientApp process.
    assert summary["train"]["1"]["osd-residual-in-norm"] == 0.0
    assert summary["train"]["2"]["osd-residual-in-norm"] > 0.0


def test_a_run_in_which_nothing_succeeds_fails_loudly(processes: Processes, tmp_path: Path) -> None:
    """Every reply is over the payload limit (max-payload-bytes=1): after max_stalled_rounds=3 rounds the
    ServerApp stops with FederationStalled naming the reason, and Flower records the run as failed."""
    port = start_superlink(processes, tmp_path, simulation=True)
    options = "options.num-supernodes = 2\noptions.backend.client-resources.num-cpus = 1\n"
    _write_flower_config(tmp_path / "flwr_home", "sim", port, options)
    cmd = [
        str(BIN / "flwr"),
        "run",
        str(ROOT),
        "sim",
        "--stream",
        "--run-config",
        "task='digits' num-server-rounds=6 max-payload-bytes=1 central-eval=false fraction-evaluate=0.0",
    ]
    done = subprocess.run(cmd, env=processes.env, capture_output=True, text=True, timeout=420, cwd=ROOT)
    out = done.stdout + done.stderr
    assert "FederationStalled" in out or "rounds in a row changed nothing" in out, f"{out[-5000:]}\n{processes.tails()}"
    assert "exceed the limit of 1 bytes" in out, out[-5000:]
    assert "[ROUND 4]" not in out  # stopped at round 3 of 6
    # Flower 1.42's `flwr run --stream` exits 0 whatever the ServerApp did; the run's status says failed.
    listed = subprocess.run(
        [str(BIN / "flwr"), "ls", "sim", "--format", "json"],
        env=processes.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "failed" in (listed.stdout + listed.stderr).lower(), listed.stdout + listed.stderr
