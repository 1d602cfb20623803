"""Costs of the text task on this machine (formerly ``python -m simulations.text_task``).

Measure with::

    python -m simulations.bench.text --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from simulations.text.cache import activation_cache_file
from simulations.text.config import TextTaskConfig
from simulations.text.data import column
from simulations.text.model import trainable_state_dict
from simulations.text.task import TextTask
from simulations.text.train import evaluate, make_optimizer, train_epoch


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def benchmark(
    config: TextTaskConfig,
    central_examples: int = 2000,
    central_epochs: int = 1,
    rounds: int = 2,
    cold: bool = False,
) -> dict[str, float]:
    """Measure the costs that size the sweep, and print them.

    Times loading, building the activation cache of the whole dataset, one
    local training step, the server's test evaluation and whole federated
    rounds (dense FedAvg without compression: every client runs
    ``local_steps`` steps, one client after another, then the server
    averages and evaluates), then a central sanity run: the upper layers
    trained for ``central_epochs`` epochs on ``central_examples`` pool
    examples, evaluated on the test set.

    Parameters
    ----------
    config
        The task configuration.
    central_examples
        Training examples of the central sanity run.
    central_epochs
        Its epochs.
    rounds
        Federated rounds to time.
    cold
        Build the activation cache even when its file exists (the file is
        then neither read nor written).

    Returns
    -------
    dict
        The measured figures (seconds, MiB, accuracies).

    """
    out: dict[str, float] = {}
    torch.manual_seed(config.seed)
    task = TextTask(config)
    _measure_loading(task, out)
    if config.mode == "cached":
        _measure_cache(task, cold, out)
    test_loader = _measure_step(task, out)
    _measure_rounds(task, rounds, test_loader, out)
    _measure_central(task, central_examples, central_epochs, test_loader, out)
    return out


def _measure_loading(task: TextTask, out: dict[str, float]) -> None:
    config = task.config
    _, out["load_model_s"] = _timed(task.base_model)
    data, out["load_data_s"] = _timed(lambda: task.dataset)
    print(
        f"threads={torch.get_num_threads()} mode={config.mode} frozen_layers={config.frozen_layers} "
        f"cls_only={config.cls_only} max_len={config.max_len} examples={len(data)} "
        f"(test {len(task.test)}, pool {len(task.pool)}) device={task.device}"
    )
    print(f"load model {out['load_model_s']:.2f}s, load data {out['load_data_s']:.2f}s")


def _measure_cache(task: TextTask, cold: bool, out: dict[str, float]) -> None:
    config, data = task.config, task.dataset
    file = activation_cache_file(config, column(data, "idx"))
    if cold:
        _, out["cache_s"] = _timed(lambda: task.activation_cache(cold=True))
        how = "built (cold)"
    else:
        how = "loaded from file" if file is not None and file.is_file() else "built and saved"
        _, out["cache_s"] = _timed(task.activation_cache)
    cache = task.activation_cache()
    out["cache_mb"] = cache.nbytes() / 2**20
    print(
        f"activation cache {how}: {len(cache)} examples, {cache.hidden.shape[0]} tokens, "
        f"{out['cache_mb']:.0f} MiB {config.cache_dtype}, {out['cache_s']:.1f}s "
        f"({1000 * out['cache_s'] / len(cache):.2f} ms/example)"
    )


def _measure_step(task: TextTask, out: dict[str, float]) -> Any:
    config = task.config
    model = task.new_model()
    out["trainable_params"] = float(sum(p.numel() for p in model.parameters() if p.requires_grad))
    print(f"trainable parameters: {int(out['trainable_params']):,}")
    train_loader, _ = task.client_loaders(0)
    opt = make_optimizer(model, config.lr, config.weight_decay)
    train_epoch(model, train_loader, opt, steps=3)  # warm-up
    steps = 20
    _, step_s = _timed(lambda: train_epoch(model, train_loader, opt, steps=steps))
    out["step_s"] = step_s / steps
    print(f"one local step (batch {config.batch_size}, AdamW): {1000 * out['step_s']:.0f} ms")
    test_loader = task.test_loader()
    _, out["test_eval_s"] = _timed(lambda: evaluate(model, test_loader))
    print(f"server evaluation on {len(task.test)} test examples: {out['test_eval_s']:.2f}s")

    return test_loader


def _measure_rounds(task: TextTask, rounds: int, test_loader: Any, out: dict[str, float]) -> None:
    config = task.config
    global_state = {k: v.clone() for k, v in trainable_state_dict(task.new_model()).items()}
    round_times = []
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        updates = []
        for cid in range(config.num_clients):
            client = task.new_model()
            client.load_state_dict(global_state, strict=False)
            loader, _ = task.client_loaders(cid, round_seed=rnd)
            optimizer = make_optimizer(client, config.lr, config.weight_decay)
            train_epoch(client, loader, optimizer, steps=config.local_steps or None)
            updates.append(trainable_state_dict(client))
        global_state = {k: torch.stack([u[k] for u in updates]).mean(0) for k in global_state}
        server = task.new_model()
        server.load_state_dict(global_state, strict=False)
        _, acc = evaluate(server, test_loader)
        round_times.append(time.perf_counter() - start)
        print(
            f"round {rnd}: {config.num_clients} clients x {config.local_steps or 'epoch'} steps, "
            f"FedAvg, test eval: {round_times[-1]:.2f}s, test acc {acc:.3f}"
        )
    out["round_s"] = float(np.mean(round_times)) if round_times else float("nan")


def _measure_central(
    task: TextTask, central_examples: int, central_epochs: int, test_loader: Any, out: dict[str, float]
) -> None:
    config = task.config
    central = task.new_model()
    torch.manual_seed(config.seed)
    pool = task.pool.select(range(min(central_examples, len(task.pool))))
    loader = task.loader(pool, shuffle=True, seed=config.seed)
    opt = make_optimizer(central, config.lr, config.weight_decay)
    loss0, acc0 = evaluate(central, test_loader)
    start = time.perf_counter()
    for _ in range(central_epochs):
        train_epoch(central, loader, opt)
    out["central_train_s"] = time.perf_counter() - start
    loss1, acc1 = evaluate(central, test_loader)
    out["central_acc_before"], out["central_acc"] = acc0, acc1
    print(
        f"central sanity run: {len(pool)} examples x {central_epochs} epoch(s), lr {config.lr}: "
        f"{out['central_train_s']:.1f}s, test loss {loss0:.3f} -> {loss1:.3f}, test acc {acc0:.3f} -> {acc1:.3f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m simulations.bench.text [--threads N] [--cold] [--<config field> value ...]``.

    Parameters
    ----------
    argv
        Arguments (default ``sys.argv[1:]``).

    """
    parser = argparse.ArgumentParser(description="Measure the MiniLM text task on this machine.")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1 per client is advised)")
    parser.add_argument("--central-examples", type=int, default=2000, help="examples of the central sanity run")
    parser.add_argument("--central-epochs", type=int, default=1, help="epochs of the central sanity run")
    parser.add_argument("--rounds", type=int, default=2, help="federated rounds to time")
    parser.add_argument("--cold", action="store_true", help="build the activation cache even if its file exists")
    for name, text in TextTaskConfig.help().items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=text.replace("%", "%%"))
    args = vars(parser.parse_args(argv))
    torch.set_num_threads(args.pop("threads"))
    bench = {k: args.pop(k) for k in ("central_examples", "central_epochs", "rounds", "cold")}
    config = TextTaskConfig.from_mapping({k: v for k, v in args.items() if v is not None})
    benchmark(config, bench["central_examples"], bench["central_epochs"], bench["rounds"], bench["cold"])


if __name__ == "__main__":
    main()
