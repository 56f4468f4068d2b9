"""BERT models for the ``sst2`` track: a BERT-base teacher and a 6-layer student initialised from its layers.

Both start from one local ``save_pretrained`` folder, ``<data-root>/pretrained/bert-base-uncased`` (config,
weights, tokenizer files), which also holds the tokenizer the track reads; hubs are not assumed reachable.

- ``bert_base``: ``BertForSequenceClassification`` from that folder (Devlin et al., NAACL 2019); the classifier
  (``num_labels`` = the track's classes) is new, initialised from the run's seed.
- ``bert_base_6l``: the same config with ``num_hidden_layers`` halved, initialised as DistilBERT (Sanh et al.
  2019, §3: "we initialize the student from the teacher by taking one layer out of two"): the embeddings and
  encoder layers 0, 2, 4, … of the pretrained folder. Deviations from DistilBERT: its architecture drops the
  token-type embeddings and the pooler and classifies through a new ``pre_classifier`` (Linear + ReLU); here the
  student keeps BERT's architecture, so its token-type embeddings and its pooler (dense + tanh on [CLS]) come from
  the pretrained folder too and its classifier is new, exactly as the teacher's starting point: the two models
  differ only in depth. Hugging Face's ``extract_distilbert.py`` picks teacher layers 0, 2, 4, 7, 9, 11; the
  paper's one-of-two rule is followed here.

Each model is wrapped so that it takes the track's one input tensor x (B, 2, L): ``x[:, 0]`` token ids and
``x[:, 1]`` the attention mask (1 real token, 0 padding); ``forward`` returns logits. ``stages`` lists the encoder
layers (``stage:i`` = ``hidden:i`` = hidden states (B, L, H) after layer i), ``attentions`` their self-attention
modules (``attn:i``), ``token_mask(x)`` the padding mask (the ``mask`` tap).

Attention runs through ``eager_with_probs``: Hugging Face's eager attention, except that the probabilities it
returns are those *before* attention dropout (the eager function returns them after dropout in training mode,
where a dropped entry is 0 and a distribution no longer sums to 1), so ``attn:i`` is the attention distribution
in training as in evaluation. Latency and FLOPs are therefore measured with eager attention, for teacher and
student alike. The padding mask is passed as the additive 4-D mask that the eager path builds itself, so no
data-dependent mask check runs (that also lets ``random_init`` models run on the meta device).

``random_init`` (listing, shape probes) builds the default bert-base config on the meta device: parameter
counts and tap shapes without allocating or initialising 110 M weights (a full-size CPU forward takes seconds
per probe on a laptop). Such a model has shapes, not values: it cannot be trained or run on real inputs.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.models import register_model

MAX_LENGTH = 128  # tokens per input, truncated and padded (the BERT paper's GLUE setting); the sst2 track's too
PRETRAINED = "bert-base-uncased"  # the folder under DATA_ROOT/pretrained/ with the models and their tokenizer
PRETRAINED_HOW_TO_GET = (
    "save it once on a machine with network: python -c \"import transformers as t; "
    "d='DATA_ROOT/pretrained/bert-base-uncased'; t.AutoTokenizer.from_pretrained('bert-base-uncased')"
    ".save_pretrained(d); t.BertModel.from_pretrained('bert-base-uncased').save_pretrained(d)\""
)
ATTENTION = "kdbench_eager_with_probs"  # registered with transformers' AttentionInterface on first use


def eager_with_probs(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``eager_attention_forward``, returning the attention probabilities before dropout."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = scores.softmax(dim=-1)
    output = torch.matmul(F.dropout(probs, p=dropout, training=module.training), value)
    return output.transpose(1, 2).contiguous(), probs


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, eager_with_probs)


class BertClassifier(nn.Module):
    """A Hugging Face ``BertForSequenceClassification`` called with one tensor x (B, 2, L) = (ids, mask)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        layers = hf.config.num_hidden_layers
        self.stages = tuple(f"hf.bert.encoder.layer.{i}" for i in range(layers))
        self.attentions = tuple(f"hf.bert.encoder.layer.{i}.attention.self" for i in range(layers))
        self.classifier_path = "hf.classifier"  # the embedding tap: the pooled [CLS] (after dropout)

    @staticmethod
    def token_mask(x: torch.Tensor) -> torch.Tensor:
        return x[:, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.hf.bert.embeddings.word_embeddings.weight.dtype
        additive = (1.0 - x[:, 1, None, None, :].to(dtype)) * torch.finfo(dtype).min  # (B, 1, 1, L)
        return self.hf(input_ids=x[:, 0], attention_mask=additive).logits


def _check_length(in_shape: tuple[int, ...], config) -> None:
    if len(in_shape) != 2 or in_shape[0] != 2 or in_shape[1] > config.max_position_embeddings:
        raise KdbenchError(f"BERT models take (2, L) token inputs with L ≤ {config.max_position_embeddings}; "
                           f"the track gives {in_shape}")


def _default_config(num_classes: int, layers: int = 12):
    from transformers import BertConfig

    return BertConfig(num_labels=num_classes, num_hidden_layers=layers, attn_implementation=ATTENTION)


def _from_config(config) -> BertClassifier:
    from transformers import BertForSequenceClassification

    with torch.device("meta"):
        return BertClassifier(BertForSequenceClassification(config))


def load_pretrained(path: Path, num_classes: int) -> nn.Module:
    """``BertForSequenceClassification`` from a ``save_pretrained`` folder, its classifier new; quiet."""
    from transformers import BertForSequenceClassification
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # the load report lists the (expected) new classifier and unused MLM head
    logging.disable_progress_bar()
    try:
        return BertForSequenceClassification.from_pretrained(path, num_labels=num_classes,
                                                             attn_implementation=ATTENTION)
    except (OSError, ValueError) as exc:
        raise KdbenchError(f"{path} is not a BERT save_pretrained folder ({str(exc).splitlines()[0]}); "
                           f"{PRETRAINED_HOW_TO_GET}") from None
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def every_other_layer(teacher: nn.Module) -> nn.Module:
    """A copy of ``teacher`` (a BertForSequenceClassification) keeping encoder layers 0, 2, 4, … (DistilBERT)."""
    from transformers import BertForSequenceClassification

    kept = list(range(0, teacher.config.num_hidden_layers, 2))
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(kept)
    student = BertForSequenceClassification(config)
    state = {}
    for key, value in teacher.state_dict().items():
        layer = re.match(r"bert\.encoder\.layer\.(\d+)\.(.*)", key)
        if layer is None:
            state[key] = value
        elif int(layer[1]) in kept:
            state[f"bert.encoder.layer.{kept.index(int(layer[1]))}.{layer[2]}"] = value
    student.load_state_dict(state)
    return student


def _build(num_classes: int, in_shape: tuple[int, ...], path: Path | None, half: bool) -> BertClassifier:
    _register_attention()
    if path is None:
        config = _default_config(num_classes, 6 if half else 12)
        _check_length(in_shape, config)
        return _from_config(config)
    hf = load_pretrained(path, num_classes)
    _check_length(in_shape, hf.config)
    return BertClassifier(every_other_layer(hf) if half else hf)


@register_model("bert_base", num_classes=2, in_shape=(2, MAX_LENGTH), pretrained=PRETRAINED,
                how_to_get=PRETRAINED_HOW_TO_GET)
def bert_base(num_classes: int, in_shape: tuple[int, ...], path: Path | None) -> BertClassifier:
    """BERT-base (12 layers, 110 M parameters), fine-tuned as a teacher."""
    return _build(num_classes, in_shape, path, half=False)


@register_model("bert_base_6l", num_classes=2, in_shape=(2, MAX_LENGTH), pretrained=PRETRAINED,
                how_to_get=PRETRAINED_HOW_TO_GET)
def bert_base_6l(num_classes: int, in_shape: tuple[int, ...], path: Path | None) -> BertClassifier:
    """BERT-base with half its layers, initialised from layers 0, 2, 4, … of the pretrained weights (DistilBERT)."""
    return _build(num_classes, in_shape, path, half=True)
