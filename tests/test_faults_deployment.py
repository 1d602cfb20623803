"""A SuperNode dies mid-run and comes back, in a real loopback deployment (slow).

One SuperLink and three SuperNodes on 127.0.0.1 run the repo's digits app
(``flwr run . --stream``) with error feedback on. Once round ``KILL_AFTER``
has been aggregated (its train row is in ``rounds.csv``) one SuperNode is
SIGKILLed, process group and all, and started again with the same node
config. The run must finish, every round's accepted + rejected + failed must
add up to the nodes sampled, and the restarted node must take part again with
its error-feedback residual lost (``osd-residual-in-norm`` == 0 in its first
reply, read per node from ``replies.csv``).

How Flower 1.42 behaves here (what the assertions rely on):

* A SuperNode started without authentication keys makes a fresh key pair and
  registers anew, so the restarted node has a *new* node id; the dead id stays
  registered and "online" until its heartbeat lapses (``HEARTBEAT_PATIENCE`` x
  30 s after its last heartbeat, which it sent every ~24 s: 36-60 s).
* The round that sampled the dead node waits for it that long, then the
  SuperLink answers in its place with a ``NODE_UNAVAILABLE`` error reply whose
  ``src_node_id`` is the SuperLink's own id (1), not the dead node's.
* The next round samples the survivors and the restarted node.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.common.constant import ErrorCode

from tests.test_flower_cli import (
    ROOT,
    Processes,
    _env,
    _free_port,
    _write_flower_config,
    start_superlink,
)

pytestmark = pytest.mark.slow

NODES = 3
ROUNDS = 4
"""Rounds 1-2 before the kill, 3 with the dead node, 4 with the restarted one (each round ~13-20 s on 2 cores)."""
KILL_AFTER = 2
"""Kill once this round's train phase is aggregated: round ``KILL_AFTER + 1`` samples the dead node."""
VICTIM = 1
"""Partition id of the SuperNode that is killed and restarted."""
RUN_TIMEOUT = 200.0
"""Seconds ``flwr run`` may take; it takes ~90-120 s on 2 cores, of which the dead node's round 40-65 s."""
RESIDUAL_IN = "osd-residual-in-norm"
RESIDUAL_OUT = "osd-residual-norm"


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(_env(tmp_path / "flwr_home"), tmp_path)
    (tmp_path / "flwr_home").mkdir()
    try:
        yield procs
    finally:
        procs.stop()


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _train_rows(results: Path) -> dict[int, dict[str, str]]:
    """The train rows of ``rounds.csv`` by round ({} while it is missing or half-written)."""
    try:
        rows = _rows(results / "rounds.csv")
        return {int(r["round"]): r for r in rows if r["phase"] == "train"}
    except (OSError, KeyError, ValueError, csv.Error):
        return {}


def _node_id(log: Path, procs: Processes, proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """The node id a SuperNode logs once the SuperLink has registered it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"SuperNode ID: (\d+)", log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            pytest.fail(f"{log.name}: SuperNode exited with {proc.returncode}\n{procs.tails()}")
        time.sleep(0.2)
    pytest.fail(f"{log.name}: no 'SuperNode ID' after {timeout}s\n{procs.tails()}")


@pytest.mark.parametrize("downlink", ["", "osd"], ids=["dense-downlink", "osd-downlink"])
def test_supernode_killed_and_restarted(processes: Processes, tmp_path: Path, downlink: str) -> None:
    """With ``downlink='osd'`` the broadcast is compressed too: survivors get chains, the newcomer the model."""
    t0 = time.monotonic()
    port = start_superlink(processes, tmp_path)

    def start_node(pid: int, name: str) -> subprocess.Popen[bytes]:
        return processes.start(
            name,
            "flower-supernode",
            "--insecure",
            "--superlink",
            f"127.0.0.1:{port}",
            "--port",
            str(_free_port()),
            "--node-config",
            f"partition-id={pid} num-partitions={NODES}",
        )

    procs = [start_node(i, f"supernode{i}") for i in range(NODES)]
    # All registered before the run starts, so that round 1 samples all three.
    nodes = [(p, _node_id(tmp_path / f"supernode{i}.log", processes, p)) for i, p in enumerate(procs)]
    victim, old_id = nodes[VICTIM]

    _write_flower_config(tmp_path / "flwr_home", "deploy", port)
    results = tmp_path / "results"
    # min-nodes=2: no round waits for the restarted node, and none starts with fewer than the survivors.
    # No evaluate phase: it would only add a second wait for the dead node.
    run_config = (
        f"task='digits' num-server-rounds={ROUNDS} min-nodes=2 fraction-evaluate=0.0 osd.error-feedback=true "
        f"results-dir='{results}'" + (f" downlink-method='{downlink}' downlink-rank=2" if downlink else "")
    )
    run = processes.start("flwr-run", "flwr", "run", str(ROOT), "deploy", "--stream", "--run-config", run_config)
    deadline = time.monotonic() + RUN_TIMEOUT

    while KILL_AFTER not in _train_rows(results):
        if run.poll() is not None:
            pytest.fail(f"flwr run exited with {run.returncode} before round {KILL_AFTER}\n{processes.tails()}")
        if time.monotonic() > deadline:
            pytest.fail(f"round {KILL_AFTER} not aggregated after {RUN_TIMEOUT}s\n{processes.tails()}")
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)  # the SuperNode and any ClientApp it started; no goodbye to the link
    victim.wait(timeout=10)
    t_kill = time.monotonic()
    # Restart once the next round has sampled its nodes (the dead one among them), so that the
    # restarted node cannot be sampled alongside its dead self. That round waits >= 36 s for the
    # dead node, so a late log line costs nothing; if none shows, restart anyway after 30 s.
    sampled_line = re.compile(rf"\[ROUND {KILL_AFTER + 1}/{ROUNDS}\].*?configure_train: Sampled", re.DOTALL)
    while not sampled_line.search((tmp_path / "flwr-run.log").read_text(errors="replace")):
        if run.poll() is not None or time.monotonic() > t_kill + 30:
            break
        time.sleep(0.2)
    t_sampled = time.monotonic()
    restarted = start_node(VICTIM, f"supernode{VICTIM}-restarted")
    new_id = _node_id(tmp_path / f"supernode{VICTIM}-restarted.log", processes, restarted)
    assert new_id != old_id  # no auth keys: a fresh key pair, so a fresh registration
    t_up = time.monotonic()

    try:
        run.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish within {RUN_TIMEOUT}s\n{processes.tails()}")
    t_done = time.monotonic()
    assert run.returncode == 0, processes.tails()
    assert restarted.poll() is None, processes.tails()
    print(
        f"\nkill at {t_kill - t0:.1f}s, round {KILL_AFTER + 1} sampled in the log {t_sampled - t_kill:.1f}s later, "
        f"restarted node registered {t_up - t_sampled:.1f}s after that, "
        f"run done at {t_done - t0:.1f}s; node id {old_id} -> {new_id}"
    )

    summary = json.loads((results / "result.json").read_text())
    assert sorted(int(r) for r in summary["central"]) == list(range(ROUNDS + 1))
    assert sorted(int(r) for r in summary["train"]) == list(range(1, ROUNDS + 1))

    # --- every round is there; who was sampled (traffic.csv: one "down" row per node sent to) --
    rounds = _train_rows(results)
    assert sorted(rounds) == list(range(1, ROUNDS + 1)), rounds
    sampled: dict[int, set[int]] = {r: set() for r in rounds}
    for row in _rows(results / "traffic.csv"):
        if row["phase"] == "train" and row["direction"] == "down":
            sampled[int(row["round"])].add(int(row["node_id"]))
    assert all(len(sampled[r]) == NODES for r in rounds), sampled
    dead_round = KILL_AFTER + 1
    assert old_id in sampled[dead_round]  # sampled after it died: the SuperLink still had it online
    assert all(old_id not in sampled[r] for r in rounds if r > dead_round), sampled
    assert all(new_id in sampled[r] for r in rounds if r > dead_round), sampled  # the restarted node is back

    # --- per node: the replies as the ServerApp received them (replies.csv) ------------------
    by_node: dict[int, dict[int, dict[str, str]]] = {}
    for row in _rows(results / "replies.csv"):
        if row["phase"] == "train":
            by_node.setdefault(int(row["node_id"]), {})[int(row["round"])] = row
    survivors = [node_id for _, node_id in nodes if node_id != old_id]
    for node_id in survivors:  # took part every round; the neighbour's death did not touch their residual
        replies = by_node[node_id]
        assert sorted(replies) == list(range(1, ROUNDS + 1)), (node_id, sorted(replies))
        assert not any(r["error"] for r in replies.values())
        assert float(replies[1][RESIDUAL_IN]) == 0.0
        assert all(float(replies[r][RESIDUAL_IN]) > 0.0 for r in range(2, ROUNDS + 1))

    old = by_node[old_id]
    assert sorted(old) == list(range(1, dead_round + 1)), sorted(old)
    assert float(old[1][RESIDUAL_IN]) == 0.0
    assert all(float(old[r][RESIDUAL_IN]) > 0.0 for r in range(2, dead_round)), old
    # The dead node's round: the SuperLink answers in its place once its heartbeat lapses.
    assert old[dead_round]["error"].startswith(f"{ErrorCode.NODE_UNAVAILABLE}:"), old[dead_round]

    came_back = by_node.get(new_id, {})
    assert came_back, f"the restarted node {new_id} never replied: {sorted(by_node)}"
    first = min(came_back)
    assert sorted(came_back) == list(range(dead_round + 1, ROUNDS + 1)), sorted(came_back)
    assert not any(row["error"] for row in came_back.values())
    assert float(came_back[first][RESIDUAL_IN]) == 0.0, came_back[first]  # e = 0: the residual died with it
    assert float(came_back[first][RESIDUAL_OUT]) > 0.0, came_back[first]  # and it keeps a new one
    assert all(float(came_back[r][RESIDUAL_IN]) > 0.0 for r in came_back if r > first)  # (with ROUNDS > 4)

    # --- the strategy's accounting: every sampled node is accepted, rejected or failed, once --
    by_round: dict[int, list[dict[str, str]]] = {}
    for node_rows in by_node.values():
        for r, x in node_rows.items():
            by_round.setdefault(r, []).append(x)
    for r, row in rounds.items():
        counts = {k: int(row[k]) for k in ("accepted", "rejected", "failed", "no-reply")}
        got = [(x["node_id"], x["src_node_id"], x["error"][:40]) for x in by_round.get(r, [])]
        assert counts["accepted"] + counts["rejected"] + counts["failed"] == len(sampled[r]), (r, counts, got)
        expected = (NODES - 1, 0, 1) if r == dead_round else (NODES, 0, 0)
        assert (counts["accepted"], counts["rejected"], counts["failed"]) == expected, (r, counts)

    if downlink:
        _check_downlink(summary, results, survivors, new_id, dead_round)


def _check_downlink(
    summary: dict[str, dict[str, dict[str, float]]], results: Path, survivors: list[int], new_id: int, dead_round: int
) -> None:
    """The compressed broadcast across a kill and a restart: no resync, chains to survivors, a model to the new node."""
    train = {int(r): m for r, m in summary["train"].items()}
    assert all(m["resyncs"] == 0 for m in train.values()), train  # every replica matched its digest
    assert train[1]["down-dense"] == NODES  # nobody holds the initial model (hold-initial is off)
    for r in range(2, ROUNDS + 1):
        assert train[r]["down-broadcasts"] >= 1, (r, train[r])
    assert train[dead_round + 1]["down-dense"] == 1  # the restarted node, a fresh registration
    down: dict[tuple[int, int], int] = {}
    for row in _rows(results / "traffic.csv"):
        if row["phase"] == "train" and row["direction"] == "down":
            down[(int(row["round"]), int(row["node_id"]))] = int(row["message_bytes"])
    last = dead_round + 1
    dense_bytes = down[(last, new_id)]
    for node_id in survivors:  # a chain of one rank-2 broadcast: a fraction of the model
        assert down[(last, node_id)] < dense_bytes / 2, (node_id, down[(last, node_id)], dense_bytes)
