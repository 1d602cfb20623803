"""3. Codec efficiency: bytes against the paper's formula, the entropy bound and dense; framing; throughput."""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from flwr.common.serde import message_to_proto

from osd_fl import CompressionConfig, Kind, compress, decode, decompress, encode, payload_budget
from osd_fl.positions import index_width
from osd_fl.records import PAYLOAD_RECORD_KEY, record_to_payload
from osd_fl.sizes import paper_bits, record_body_bytes, total_dense_bytes
from simulations.bench.harness import MB, header, load1, print_table, repeat, wait_quiet
from simulations.bench.workloads import (
    MODEL_LABELS,
    mod_replies,
    model_shapes,
    synthetic_importance,
    synthetic_update,
    train_messages,
)


def entropy_bits(count: int, slots: int) -> float:
    """log2 C(slots, count): the fewest bits that can name which entries are kept."""
    return (math.lgamma(slots + 1) - math.lgamma(count + 1) - math.lgamma(slots - count + 1)) / math.log(2)


def codec_stats(blob: bytes, value_bits: int, specs: Mapping[str, Any]) -> dict[str, float]:
    """Our bytes of the compressed matrices versus the paper's formula and the entropy bound."""
    payload = decode(blob, expected=specs)
    vb = value_bits // 8
    ours = paper = bound = 0.0
    kept = sparse_recs = dense_recs = 0
    dense_fixed = 0
    for rec in payload.records:
        if rec.kind == Kind.LOWRANK:
            n, d = rec.matrix_shape
            k = rec.rank
            s_a, s_b = rec.sections[0].count, rec.sections[1].count
            ours += record_body_bytes(rec, payload.value_dtype)
            kept += s_a + s_b
            if rec.sections[0].positions is None and rec.sections[1].positions is None:
                dense_recs += 1  # dense factors: the paper's TruncSVD cost, no index
                paper += value_bits * (s_a + s_b) / 8
                bound += value_bits * (s_a + s_b) / 8
            else:
                sparse_recs += 1
                paper += paper_bits(n, d, k, s_a, s_b, value_bits) / 8
                bound += (value_bits * (s_a + s_b) + entropy_bits(s_a, n * k) + entropy_bits(s_b, k * d)) / 8
        elif rec.kind == Kind.SPARSE:
            sec = rec.sections[0]
            ours += record_body_bytes(rec, payload.value_dtype)
            kept += sec.count
            sparse_recs += 1
            paper += (value_bits + index_width(sec.slots)) * sec.count / 8
            bound += (value_bits * sec.count + entropy_bits(sec.count, sec.slots)) / 8
        elif rec.kind == Kind.DENSE:
            dense_fixed += rec.numel * vb
    return {
        "ours": ours,
        "paper": paper,
        "bound": bound,
        "kept": kept,
        "sparse": sparse_recs,
        "dense_factors": dense_recs,
        "dense_tensors": dense_fixed,
    }


def section_codec(args: argparse.Namespace) -> None:
    header("3. Codec: bytes of the kept entries, Flower framing, encode/decode speed", args)
    ranks = [1, 4] if args.quick else [1, 4, 16]
    variants: list[tuple[str, dict[str, Any], int]] = [
        ("osd adaptive c", {"method": "osd", "value_dtype": "float32"}, 32),
        ("osd fixed c", {"method": "osd", "adaptive": False, "value_dtype": "float32"}, 32),
        ("magtruncsvd", {"method": "magtruncsvd"}, 32),
        ("topk", {"method": "topk"}, 32),
        ("osd adaptive c, fp16", {"method": "osd", "value_dtype": "float16"}, 16),
    ]
    models = ["minilm", "bert-base"]
    rows: list[list[str]] = []
    frame_rows: list[list[str]] = []
    speed_rows: list[list[str]] = []
    for model in models:
        a, b, c = codec_model(args, model, ranks, variants)
        rows += a
        frame_rows += b
        speed_rows += c
    print_codec_tables(rows, frame_rows, speed_rows)
    print(f"load average (1 min) at end: {load1():.2f}")


def codec_model(
    args: argparse.Namespace, model: str, ranks: list[int], variants: list[tuple[str, dict[str, Any], int]]
) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    """One model: bytes against the paper per variant and rank; framing and speed of OSD adaptive c."""
    rows: list[list[str]] = []
    frame_rows: list[list[str]] = []
    speed_rows: list[list[str]] = []
    print(f"{model}: {wait_quiet(f'codec {model}')}")
    shapes = model_shapes(model, args.quick)
    update = synthetic_update(shapes, seed=0)
    imp = synthetic_importance(shapes, 0)
    dense_bytes = total_dense_bytes(shapes)
    specs = {k: (s, torch.float32) for k, s in shapes.items()}
    zero = {k: torch.zeros(shape) for k, shape in shapes.items()}  # the global model the framing replies answer
    for rank in ranks:
        for label, opts, vbits in variants:
            z = imp if opts["method"] == "osd" else None
            blob = compress(update, rank=rank, importance=z, **opts)
            st = codec_stats(blob, vbits, specs)
            budget = payload_budget(shapes, rank=rank, **opts)
            rows.append(
                [
                    MODEL_LABELS[model],
                    str(rank),
                    label,
                    f"{st['kept']:,}",
                    f"{st['sparse']}/{st['dense_factors']}",
                    f"{st['ours']:,.0f}",
                    f"{st['paper']:,.0f}",
                    f"{st['ours'] / st['paper']:.3f}",
                    f"{st['bound'] / st['paper']:.3f}",
                    f"{len(blob):,}",
                    f"{len(blob) / budget:.3f}",
                    f"{len(blob) / dense_bytes:.4f}",
                ]
            )
            if label != "osd adaptive c":
                continue
            # Flower framing: a train reply as clients.osd_mod builds it, as Flower serializes it
            reply = mod_replies(
                train_messages(zero, CompressionConfig(rank=rank, value_dtype="float32"), 1), shapes, 1
            )[0]
            reply_bytes = len(record_to_payload(reply.content[PAYLOAD_RECORD_KEY]))
            size = message_to_proto(reply).ByteSize()
            frame_rows.append(
                [
                    MODEL_LABELS[model],
                    str(rank),
                    f"{reply_bytes:,}",
                    f"{size:,}",
                    f"{size - reply_bytes:,}",
                    f"{100 * (size - reply_bytes) / size:.3f}%",
                ]
            )
            # encode / decode / rebuild speed (median of repeats)
            payload = decode(blob, expected=specs)
            reps = max(3, args.repeats)
            t_enc = statistics.median(repeat(partial(encode, payload), reps))
            t_dec = statistics.median(repeat(partial(decode, blob, expected=specs), reps))
            t_full = statistics.median(repeat(partial(decompress, blob, expected=specs), reps))
            t_comp = statistics.median(repeat(partial(compress, update, rank=rank, importance=imp), max(1, reps // 2)))
            speed_rows.append(
                [
                    MODEL_LABELS[model],
                    str(rank),
                    f"{len(blob) / MB:.2f}",
                    f"{len(blob) / MB / t_enc:,.0f}",
                    f"{len(blob) / MB / t_dec:,.0f}",
                    f"{t_full * 1e3:.1f}",
                    f"{dense_bytes / MB / t_full:,.0f}",
                    f"{dense_bytes / MB / t_comp:,.0f}",
                ]
            )
    return rows, frame_rows, speed_rows


def print_codec_tables(rows: list[list[str]], frame_rows: list[list[str]], speed_rows: list[list[str]]) -> None:
    """The three tables of the codec section."""
    print("\n## Bytes of the compressed matrices: ours vs the paper's formula (same kept entries)")
    print(
        "ours = kind-specific bytes of every compressed matrix (rank field, section headers, positions, values); "
        "paper = mu/8 with mu = b(s_A+s_B) + ceil(log2(n k)) s_A + ceil(log2(k d)) s_B (b = value bits; "
        "a dense-factor record, c = 0, is charged b(s_A+s_B), TruncSVD's cost; top-k: (b + ceil(log2(n d))) s); "
        "bound = values + log2 C(slots, kept) per section (the fewest bits any position code can use)"
    )
    print_table(
        [
            "model",
            "r",
            "method",
            "kept entries",
            "sparse/dense-factor records",
            "ours B",
            "paper B",
            "ours / paper",
            "bound / paper",
            "payload B",
            "payload / budget",
            "payload / dense fp32",
        ],
        rows,
    )
    print("\n## Flower framing of the reply (osd adaptive c)")
    print(
        "message = flwr.common.serde.message_to_proto(reply).ByteSize() of the train reply as clients.osd_mod "
        "builds it (payload ArrayRecord + its MetricRecord + metadata; "
        "the payload compresses that node's synthetic update)"
    )
    print_table(["model", "r", "payload B", "message B", "framing B", "framing share"], frame_rows)
    print("\n## Encode / decode throughput (osd adaptive c, median)")
    print(
        "encode = codec.encode(Payload) (positions, values, CRC); decode = codec.decode with expected shapes "
        "(parse + validate, no tensors); decompress = decode + rebuild every dense tensor; "
        "MB/s of payload bytes, dense-equivalent = float32 size of the rebuilt update"
    )
    print_table(
        [
            "model",
            "r",
            "payload MB",
            "encode MB/s",
            "decode MB/s",
            "decompress ms",
            "decompress dense-equiv MB/s",
            "compress dense-equiv MB/s",
        ],
        speed_rows,
    )
