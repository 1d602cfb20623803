"""The model: MiniLM loading and surgery (a frozen lower part, a trainable upper part, under HF names)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
import transformers
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from osd_fl.errors import ConfigError

try:  # transformers 5: encoder masks and attention functions behind one interface
    from transformers.masking_utils import create_bidirectional_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward
except ImportError as _exc:  # pragma: no cover - depends on the installed version
    raise ImportError(
        f"simulations.text needs transformers>=5 (found {transformers.__version__}): "
        f"pip install 'transformers>=5,<6' ({_exc})"
    ) from _exc
from simulations.text.assets import find_minilm_path


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the load report and progress bar of ``from_pretrained``, then restore them."""
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity(40)  # logging.ERROR
    logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def load_minilm(
    path: str | os.PathLike[str] | None = None, num_labels: int = 2, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the shipped MiniLM (or the model folder ``path``) as a sequence classifier, with its tokenizer, offline.

    Parameters
    ----------
    path
        Model folder; default :func:`find_minilm_path`.
    num_labels
        Classes of the new classification head.
    seed
        Seeds the random initialisation of the head (the encoder is
        pretrained), so every process builds the same model.

    Returns
    -------
    tuple
        ``(model, tokenizer)``; the model is in eval mode on the CPU.

    """
    model_dir = Path(path) if path is not None else find_minilm_path()
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"model_path={str(model_dir)!r} is not a local Hugging Face model folder (no config.json); "
            "save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)"
        )
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=num_labels, local_files_only=True, ignore_mismatched_sizes=True
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    return cast(PreTrainedModel, model), cast(PreTrainedTokenizerBase, tokenizer)


def _bert_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.ModuleList, nn.Module, nn.Module, nn.Module]:
    """``(bert, embeddings, layers, pooler, dropout, classifier)`` of a BertForSequenceClassification."""
    try:
        bert = cast(nn.Module, model.bert)
        embeddings = cast(nn.Module, bert.embeddings)
        layers = cast(nn.ModuleList, cast(nn.Module, bert.encoder).layer)
        pooler = cast(nn.Module, bert.pooler)
        dropout = cast(nn.Module, model.dropout)
        classifier = cast(nn.Module, model.classifier)
    except AttributeError as exc:
        raise TypeError(f"expected a BertForSequenceClassification, got {type(model).__name__}: {exc}") from None
    if pooler is None:
        raise TypeError("the model has no pooler; the classifier reads the pooled [CLS] state")
    return bert, embeddings, layers, pooler, dropout, classifier


class LowerMiniLM(nn.Module):
    """The frozen lower part: embeddings and BertLayers ``0 .. frozen_layers - 1``.

    Holds the very modules of the model it was built from (no copies).

    Parameters
    ----------
    model
        A ``BertForSequenceClassification``.
    frozen_layers
        Number of lower BertLayers to run after the embeddings.

    """

    def __init__(self, model: nn.Module, frozen_layers: int) -> None:
        super().__init__()
        bert, embeddings, layers, _, _, _ = _bert_parts(model)
        if not 0 <= frozen_layers <= len(layers):
            raise ConfigError(f"frozen_layers={frozen_layers} must be in 0..{len(layers)}")
        self.config: Any = bert.config
        self.embeddings = embeddings
        self.layers = nn.ModuleList([layers[i] for i in range(frozen_layers)])

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states after the lower layers.

        Parameters
        ----------
        input_ids
            Token ids, shape (B, T).
        attention_mask
            1 for tokens, 0 for padding, shape (B, T).
        token_type_ids
            Segment ids (default zeros, as for single sentences).

        Returns
        -------
        torch.Tensor
            Shape (B, T, hidden_size).

        """
        hidden = cast(torch.Tensor, self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids))
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for layer in self.layers:
            hidden = _layer_output(layer(hidden, mask))
        return hidden


class _UpperEncoder(nn.Module):
    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.layer = nn.ModuleDict(layers)


class _UpperBert(nn.Module):
    def __init__(self, layers: Mapping[str, nn.Module], pooler: nn.Module) -> None:
        super().__init__()
        self.encoder = _UpperEncoder(layers)
        self.pooler = pooler


class UpperMiniLM(nn.Module):
    """The trained upper part: BertLayers ``frozen_layers ..``, the pooler and the classifier.

    It runs the very Hugging Face modules of the model it was built from
    (shared, not copied: training it trains that model's upper layers), on
    hidden states produced by :class:`LowerMiniLM` (typically cached). Its
    parameter names are the full model's (``bert.encoder.layer.5.attention.
    self.query.weight`` is a 384 x 384 matrix, ``...intermediate.dense.weight``
    1536 x 384), so ``full_model.load_state_dict(upper.state_dict(),
    strict=False)`` puts trained weights back, and an update compressor sees
    the same tensors it would see on the full model.

    Parameters
    ----------
    model
        A ``BertForSequenceClassification``.
    frozen_layers
        Number of lower BertLayers *not* included (0 .. num_layers).
    cls_only
        Run the last layer for the [CLS] position only. The classifier reads
        nothing else, so logits and gradients are the same as running the
        whole layer (up to float rounding), at a fraction of its cost: the
        keys and values are still projected for every token, the query,
        attention output and feed-forward block for one.

    """

    def __init__(self, model: nn.Module, frozen_layers: int, cls_only: bool = True) -> None:
        super().__init__()
        bert, _, layers, pooler, dropout, classifier = _bert_parts(model)
        if not 0 <= frozen_layers <= len(layers):
            raise ConfigError(f"frozen_layers={frozen_layers} must be in 0..{len(layers)}")
        self.config: Any = bert.config
        self.frozen_layers = frozen_layers
        self.cls_only = cls_only
        self.bert = _UpperBert({str(i): layers[i] for i in range(frozen_layers, len(layers))}, pooler)
        self.dropout = dropout
        self.classifier = classifier

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits from the lower part's hidden states.

        Parameters
        ----------
        hidden_states
            Output of :class:`LowerMiniLM`, shape (B, T, hidden_size).
        attention_mask
            1 for tokens, 0 for padding, shape (B, T).

        Returns
        -------
        torch.Tensor
            Logits, shape (B, num_labels).

        """
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask)
        layers = list(self.bert.encoder.layer.values())
        hidden = hidden_states
        for i, layer in enumerate(layers):
            if self.cls_only and i == len(layers) - 1:
                hidden = self._last_layer_cls(layer, hidden, mask)
            else:
                hidden = _layer_output(layer(hidden, mask))
        pooled = cast(torch.Tensor, self.bert.pooler(hidden))
        return cast(torch.Tensor, self.classifier(self.dropout(pooled)))

    def _last_layer_cls(self, layer: Any, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
        """Run a BertLayer for the [CLS] query only; returns shape (B, 1, H).

        The pooler reads position 0 of the last layer and nothing else, and
        in a BertLayer position 0's output depends on the other positions
        only through the keys and values. So the keys and values are
        projected for every token, while the query, the attention output,
        the residual LayerNorms and the feed-forward block run on one token.
        The modules (and the attention function) are the layer's own; the
        result and every gradient equal those of the whole layer.
        """
        attention = layer.attention
        self_attn = attention.self
        batch, length, _ = hidden.shape
        heads, head_size = int(self_attn.num_attention_heads), int(self_attn.attention_head_size)
        cls = hidden[:, :1]
        query = self_attn.query(cls).view(batch, 1, heads, head_size).transpose(1, 2)
        key = self_attn.key(hidden).view(batch, length, heads, head_size).transpose(1, 2)
        value = self_attn.value(hidden).view(batch, length, heads, head_size).transpose(1, 2)
        attention_fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        context, _ = attention_fn(
            self_attn,
            query,
            key,
            value,
            mask[:, :, :1, :] if isinstance(mask, torch.Tensor) else mask,
            dropout=float(self_attn.dropout.p) if self_attn.training else 0.0,
            scaling=self_attn.scaling,
        )
        context = context.reshape(batch, 1, heads * head_size).contiguous()
        attention_out = cast(torch.Tensor, attention.output(context, cls))
        return cast(torch.Tensor, layer.feed_forward_chunk(attention_out))


def _layer_output(out: Any) -> torch.Tensor:
    """A BertLayer's hidden states (transformers 5 returns a tensor, older versions a tuple)."""
    return cast(torch.Tensor, out[0] if isinstance(out, tuple) else out)


def split_minilm(model: nn.Module, frozen_layers: int, cls_only: bool = True) -> tuple[LowerMiniLM, UpperMiniLM]:
    """Split a MiniLM classifier into its frozen lower and trainable upper parts.

    Parameters
    ----------
    model
        A ``BertForSequenceClassification`` (e.g. from :func:`load_minilm`).
    frozen_layers
        Lower BertLayers frozen with the embeddings.
    cls_only
        Run the last upper layer for the [CLS] position only (exact, faster;
        see :class:`UpperMiniLM`).

    Returns
    -------
    tuple
        ``(lower, upper)``; ``lower`` has ``requires_grad=False`` and is in
        eval mode, ``upper`` has ``requires_grad=True``, and ``upper(lower(ids, mask), mask)`` equals the model's
        logits. Both share the model's modules.

    """
    lower = LowerMiniLM(model, frozen_layers)
    upper = UpperMiniLM(model, frozen_layers, cls_only)
    lower.requires_grad_(False)
    upper.requires_grad_(True)
    lower.eval()
    return lower, upper


def freeze_lower(model: nn.Module, frozen_layers: int, freeze_embeddings: bool = True) -> nn.Module:
    """Freeze the embeddings and lower BertLayers of a full model in place (full mode).

    Parameters
    ----------
    model
        A ``BertForSequenceClassification`` (embeddings and lower layers), or
        any Hugging Face classifier (its input embeddings only; ``frozen_layers``
        must then be 0).
    frozen_layers
        Lower BertLayers to freeze.
    freeze_embeddings
        Also freeze the embeddings.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    """
    if not hasattr(model, "bert"):  # another architecture: its input embeddings, no layer freezing
        if frozen_layers:
            raise ConfigError(
                f"frozen_layers={frozen_layers} needs a BERT-family model ({type(model).__name__} given); "
                "set frozen_layers=0"
            )
        get_embeddings = getattr(model, "get_input_embeddings", None)
        if get_embeddings is not None:
            cast(nn.Module, get_embeddings()).requires_grad_(not freeze_embeddings)
        return model
    _, embeddings, layers, _, _, _ = _bert_parts(model)
    if not 0 <= frozen_layers <= len(layers):
        raise ConfigError(f"frozen_layers={frozen_layers} must be in 0..{len(layers)}")
    embeddings.requires_grad_(not freeze_embeddings)
    for i, layer in enumerate(layers):
        layer.requires_grad_(i >= frozen_layers)
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the parameters that train (``requires_grad``), detached, by name.

    Parameters
    ----------
    model
        Any module (the upper model or a partly frozen full model).

    Returns
    -------
    dict
        ``{name: tensor}`` in ``named_parameters`` order; this is what a
        client's update is made of.

    """
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
