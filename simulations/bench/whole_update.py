"""Whole-update bytes: what a rank-r payload costs for a whole model, not just its big matrices.

For three models a user is likely to bring, a real local update (weights
after a few AdamW steps minus the weights before) is compressed at rank r
and the payload's bytes are split by the kind of tensor they carry:

* ``cnn``: Flower's quickstart-pytorch CNN (two 5x5 convolutions, three
  linear layers) on random 3x32x32 images: small 4-D kernels and biases.
* ``bert-tiny``: a BERT of bert-tiny's shape (2 layers, hidden 128) with
  trainable embeddings, randomly initialised, on Rotten Tomatoes token ids:
  the embeddings are most of the model and their update is row-sparse
  (only the rows of tokens seen change).
* ``minilm``: the shipped all-MiniLM-L6-v2, every layer and the embeddings
  trained, on Rotten Tomatoes.

Each is compressed with the old defaults (``min_numel=4096``,
``embedding_policy="dense"``) and the current ones, so the table shows
what the defaults buy::

    python -m simulations.bench.whole_update                 # r = 1, truncsvd and osd
    python -m simulations.bench.whole_update --ranks 1,4 --steps 10

The ratio is dense float32 bytes of the whole update over the payload's
bytes (the codec's encoding, headers included).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from osd_fl import CompressionConfig, compress, decode, record_bytes
from simulations.devices import seeded, torch_threads
from simulations.sweep import CACHED_ERA
from simulations.text import TextTask, TextTaskConfig
from simulations.text.train import loss_fn, make_optimizer

__all__ = ["QuickstartCNN", "main", "model_update", "payload_shares"]

#: The defaults before issue 14: its routing (CACHED_ERA) and float32 values for every method.
OLD_DEFAULTS: dict[str, Any] = {**CACHED_ERA, "value_dtype": "float32"}


class QuickstartCNN(nn.Module):
    """The CNN of Flower's quickstart-pytorch example (CIFAR-10 shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a (B, 3, 32, 32) batch."""
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))  # type: ignore[no-any-return]


def _cnn_batches(steps: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for _ in range(steps):
        yield torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator)


def _text_batches(steps: int) -> Iterator[dict[str, torch.Tensor]]:
    cfg = TextTaskConfig(mode="full", frozen_layers=0, max_len=48, num_clients=4, max_examples=4000, test_size=1000)
    train, _ = TextTask(cfg).client_loaders(0, round_seed=1)
    for step, batch in enumerate(train):
        if step >= steps:
            return
        yield batch


def _minilm() -> nn.Module:
    return TextTask(TextTaskConfig(mode="full", frozen_layers=0, freeze_embeddings=False)).new_model()


def _bert_tiny() -> nn.Module:
    cfg = BertConfig(
        vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512
    )
    cfg.num_labels = 2
    return BertForSequenceClassification(cfg)


def model_update(name: str, steps: int, lr: float = 5e-5) -> dict[str, torch.Tensor]:
    """``{name: dW}`` of ``steps`` AdamW steps of model ``name`` (cnn, bert-tiny, minilm), seeded."""
    with seeded(0):
        generator = torch.Generator().manual_seed(0)
        model = {"cnn": QuickstartCNN, "bert-tiny": _bert_tiny, "minilm": _minilm}[name]()
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        optimizer = make_optimizer(model, lr if name != "cnn" else 1e-3)
        model.train()
        batches: Iterator[Any] = _cnn_batches(steps, generator) if name == "cnn" else _text_batches(steps)
        for batch in batches:
            optimizer.zero_grad()
            cnn = name == "cnn"
            loss = nn.functional.cross_entropy(model(batch[0]), batch[1]) if cnn else loss_fn(model, batch)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        return {k: (v.detach() - before[k]) for k, v in model.named_parameters()}


def _kind_of(name: str, shape: Sequence[int], pattern: str) -> str:
    if pattern and pattern in name:
        return "word embeddings"
    if len(shape) < 2:
        return "1-D (biases, norms)"
    numel = 1
    for s in shape:
        numel *= s
    if len(shape) == 4:
        return "conv kernels"
    return "small matrices (< 4096)" if numel < 4096 else "matrices"


def payload_shares(update: Mapping[str, torch.Tensor], config: CompressionConfig) -> dict[str, Any]:
    """Bytes of ``update`` compressed with ``config``: total, ratio to dense float32, and bytes by tensor kind."""
    blob = compress(update, config=config)
    payload = decode(blob)
    shapes = {k: tuple(v.shape) for k, v in update.items()}
    by_kind: dict[str, int] = {}
    kinds_sent: dict[str, set[str]] = {}
    for rec in payload.records:
        kind = _kind_of(rec.name, shapes[rec.name], config.embedding_pattern)
        by_kind[kind] = by_kind.get(kind, 0) + record_bytes(rec, payload.value_dtype)
        kinds_sent.setdefault(kind, set()).add(rec.kind.name.lower())
    dense = sum(4 * v.numel() for v in update.values())
    return {"bytes": len(blob), "ratio": dense / len(blob), "dense": dense, "by_kind": by_kind, "sent_as": kinds_sent}


def _rows(
    models: Sequence[str],
    ranks: Sequence[int],
    methods: Sequence[str],
    steps: int,
    options: Mapping[str, str] | None = None,
) -> list[str]:
    lines = [
        "| model | r | method | defaults | payload bytes | ratio to dense | share by tensor kind (bytes, sent as) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in models:
        update = model_update(name, steps)
        changed = sum(int(v.abs().amax(dim=-1).gt(0).sum()) for k, v in update.items() if "word_embeddings" in k)
        rows_note = f" ({changed:,} embedding rows changed)" if changed else ""
        print(f"{name}: {sum(v.numel() for v in update.values()):,} parameters{rows_note}", flush=True)
        for rank in ranks:
            for method in methods:
                for label, extra in (("old", OLD_DEFAULTS), ("current", {})):
                    base = CompressionConfig.from_mapping({"method": method, "rank": rank, **(options or {})})
                    cfg = base.replace(**extra)
                    s = payload_shares(update, cfg)
                    parts = ", ".join(
                        f"{k} {100 * v / s['bytes']:.0f}% ({'/'.join(sorted(s['sent_as'][k]))})"
                        for k, v in sorted(s["by_kind"].items(), key=lambda kv: -kv[1])
                    )
                    lines.append(
                        f"| {name} | {rank} | {method} | {label} | {s['bytes']:,} | {s['ratio']:.1f}x | {parts} |"
                    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print the whole-update table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn,bert-tiny,minilm")
    ap.add_argument("--ranks", default="1")
    ap.add_argument("--methods", default="truncsvd,osd")
    ap.add_argument("--steps", type=int, default=10, help="local AdamW steps that make the update")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--compression",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="CompressionConfig field for every row (e.g. value_dtype=int8 budget_dtype=float32 relax=12)",
    )
    args = ap.parse_args(argv)
    bad = [kv for kv in args.compression if "=" not in kv]
    if bad:
        ap.error(f"--compression takes KEY=VALUE, got {bad}")
    options = dict(kv.split("=", 1) for kv in args.compression)
    with torch_threads(args.threads):
        lines = _rows(
            args.models.split(","),
            [int(r) for r in args.ranks.split(",")],
            args.methods.split(","),
            args.steps,
            options,
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
