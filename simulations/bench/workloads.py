"""The workloads every benchmark shares: model shapes, synthetic updates and importance maps, LLaMA shapes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from transformers import BertConfig, BertForSequenceClassification

from clients import osd_mod
from osd_fl import CompressionConfig, compute_importance
from osd_fl.records import CONFIG_PREFIX, IMPORTANCE_RECORD_KEY, config_to_record, record_to_tensors, tensors_to_record
from simulations.devices import seeded
from strategies.local_grid import LocalGrid, train_message

#: (layers, hidden, heads, intermediate) of the BERT-family encoders benchmarked; quick = fewer layers.
BERT_CONFIGS: dict[str, tuple[int, int, int, int]] = {
    "minilm": (6, 384, 12, 1536),  # all-MiniLM-L6-v2, the project's text-task model
    "bert-base": (12, 768, 12, 3072),
    "bert-large": (24, 1024, 16, 4096),  # server section only: 3.6x BERT-base's update
}


MODEL_LABELS = {
    "minilm": "MiniLM-L6 (H384)",
    "bert-base": "BERT-base (H768, L12)",
    "bert-large": "BERT-large (H1024, L24)",
}


def bert_model(name: str, quick: bool, *, meta: bool = False) -> torch.nn.Module:
    """A randomly initialised BERT-family sequence classifier of ``name``'s shape (no download)."""
    layers, hidden, heads, inter = BERT_CONFIGS[name]
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=2 if quick else layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=512,
    )
    cfg.num_labels = 2
    if meta:
        with torch.device("meta"):
            return BertForSequenceClassification(cfg)
    with seeded(0):  # the same weights every time, the caller's generator untouched
        model = BertForSequenceClassification(cfg)
    for n, p in model.named_parameters():
        if "embeddings" in n:  # frozen, as in the text task: no gradient, not uploaded
            p.requires_grad_(False)
    return model


def update_names(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors a client uploads: every parameter but the (frozen) embeddings."""
    return {n: tuple(p.shape) for n, p in model.named_parameters() if "embeddings" not in n}


def model_shapes(name: str, quick: bool) -> dict[str, tuple[int, ...]]:
    return update_names(bert_model(name, quick, meta=True))


def synthetic_importance(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Heavy-tailed non-negative maps (|N(0,1)|^2) for every matrix."""
    g = torch.Generator().manual_seed(seed + 7919)
    return {k: torch.randn(s, generator=g).square_() for k, s in shapes.items() if len(s) == 2}


def token_batches(count: int, batch: int, seq: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1000, 30000, (batch, seq), generator=g),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=g),
        }
        for _ in range(count)
    ]


def grad_importance(
    model: torch.nn.Module, device: torch.device, names: list[str], batches: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``Z = |G|`` of the validation loss, as a client computes it (eval mode, 4 batches)."""

    def loss_fn(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        out = m(**{k: v.to(device) for k, v in b.items()})
        loss: torch.Tensor = out.loss
        return loss

    return compute_importance(model, batches, loss_fn, form="grad", num_batches=len(batches), names=names)


#: LLaMA-7B's per-layer matrices: q, k, v, o (4096 x 4096) and gate, up (11008 x 4096), down (4096 x 11008).
LLAMA_LAYER = [
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 4096, 4096),
    ("self_attn.v_proj", 4096, 4096),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 11008, 4096),
    ("mlp.up_proj", 11008, 4096),
    ("mlp.down_proj", 4096, 11008),
]


def llama_matrices(quick: bool) -> Iterator[tuple[str, int, int]]:
    """The 224 matrices of LLaMA-7B (quick: 2 layers at a quarter of each side)."""
    layers, scale = (2, 4) if quick else (32, 1)
    for i in range(layers):
        for name, n, d in LLAMA_LAYER:
            yield f"model.layers.{i}.{name}.weight", n // scale, d // scale


def llama_update(
    n: int, d: int, seed: int, device: torch.device, out: torch.Tensor | None, zout: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic ``dW`` (decaying rank-16 part plus 20% dense noise) and its importance map, in place."""
    g = torch.Generator(device=device).manual_seed(seed)
    rank = 16
    s = torch.logspace(0, -1.5, rank, device=device)
    u = torch.randn(n, rank, generator=g, device=device) * s
    v = torch.randn(rank, d, generator=g, device=device) / (n * d) ** 0.25
    low_std = float(s.square().sum().sqrt()) / (n * d) ** 0.25  # std of u @ v entries, without forming it
    dw = torch.randn(n, d, generator=g, device=device, out=out).mul_(0.2 * low_std)
    dw.addmm_(u, v).mul_(1e-3)
    z = torch.randn(n, d, generator=g, device=device, out=zout).square_()
    return dw, z


def synthetic_update(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Low-rank-plus-noise updates (a decaying rank-16 part and 20% noise energy)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            n, d = shape
            r = 16
            s = torch.logspace(0, -1.5, r)
            low = (torch.randn(n, r, generator=g) * s) @ torch.randn(r, d, generator=g) / (n * d) ** 0.25
            out[name] = 1e-3 * (low + 0.2 * low.std() * torch.randn(n, d, generator=g))
        else:
            out[name] = 1e-3 * torch.randn(shape, generator=g)
    return out


def minilm_shapes(layers: int = 6, hidden: int = 384, ffn: int = 1536) -> dict[str, tuple[int, ...]]:
    """Shapes of a MiniLM encoder's trainable matrices, biases and norms (no embeddings)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + m + ".weight"] = (hidden, hidden)
            shapes[p + m + ".bias"] = (hidden,)
        shapes[p + "intermediate.dense.weight"] = (ffn, hidden)
        shapes[p + "intermediate.dense.bias"] = (ffn,)
        shapes[p + "output.dense.weight"] = (hidden, ffn)
        shapes[p + "output.dense.bias"] = (hidden,)
        shapes[p + "output.LayerNorm.weight"] = (hidden,)
    return shapes


def synthetic_client_app(shapes: Mapping[str, tuple[int, ...]], *, reuse: bool = True) -> Any:
    """A ClientApp (with :func:`clients.osd_mod`) whose "training" adds a fixed synthetic update.

    With ``reuse`` each node draws its update and importance maps once and
    keeps them for its later rounds, so a round costs what the protocol
    costs: messages, compression, decoding and aggregation, not training.
    Without it (each node trains once) nothing is kept: two model-sized
    tensors per node would otherwise stay alive (18 GB for 8 BERT-large
    nodes). Importance maps are attached only when the server asked for
    OSD (``osd.*`` keys in the train config).
    """
    app = ClientApp(mods=[osd_mod])
    cache: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node = int(context.node_id)
        drawn = cache.get(node) or (synthetic_update(dict(shapes), seed=node), synthetic_importance(shapes, node))
        if reuse:
            cache[node] = drawn
        delta, imp = drawn
        arrays = next(iter(msg.content.array_records.values()))
        trained = {k: v + delta[k] for k, v in record_to_tensors(arrays).items()}
        content = RecordDict(
            {"arrays": tensors_to_record(trained), "metrics": MetricRecord({"num-examples": 100, "train-loss": 0.5})}
        )
        asks_osd = any(k.startswith(CONFIG_PREFIX) for rec in msg.content.config_records.values() for k in rec)
        if asks_osd:
            content[IMPORTANCE_RECORD_KEY] = tensors_to_record(imp)
        return Message(content=content, reply_to=msg)

    return app


def mod_replies(messages: list[Message], shapes: Mapping[str, tuple[int, ...]], nodes: int) -> list[Message]:
    """Train replies to ``messages`` (for nodes 1001 .. 1000 + ``nodes``) as clients build them.

    :func:`synthetic_client_app`, with :func:`clients.osd_mod`, runs on a
    :class:`~strategies.local_grid.LocalGrid`, through Flower's serialization both ways.
    """
    return list(LocalGrid(synthetic_client_app(shapes, reuse=False), nodes).send_and_receive(messages))


def train_messages(global_model: Mapping[str, torch.Tensor], config: CompressionConfig, count: int) -> list[Message]:
    """``count`` train instructions (nodes 1001, ...) carrying ``global_model`` and ``config``'s ``osd.*`` keys."""
    content = RecordDict({"arrays": tensors_to_record(dict(global_model)), "config": config_to_record(config)})
    return [train_message(content, 1001 + i) for i in range(count)]
