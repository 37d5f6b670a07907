"""A small transformer fine-tuned with LoRA adapters: the model of ``examples/lora_finetune.py``.

The base is a BERT built from a config with ``transformers`` (randomly initialised, nothing is
downloaded; in practice it would be a pre-trained checkpoint the factory loads from local
disk); ``peft`` wraps it with LoRA adapters on the attention's query and value projections
and a trainable classification head. Everything else is frozen, and ``fed-server --trainable
@requires-grad`` moves only what ``peft`` left trainable.

Workers name this factory themselves (``fed-worker --model lora_model:tiny_bert_lora`` with
``examples`` on ``PYTHONPATH``): a plan only refers to it, it never carries code.

The task (:func:`make_task`): sequences of ``length`` token ids; the label says whether the
sequence holds the "trigger" token 3.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = ["LoraClassifier", "make_task", "tiny_bert_lora"]

VOCAB = 64
TRIGGER = 3


class LoraClassifier(nn.Module):
    """``peft`` model whose ``forward`` takes token ids (as fedcore's float shards hold them)
    and returns the logits, as fedcore's training loop expects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: Any = self.model(input_ids=x.long())
        return out.logits  # type: ignore[no-any-return]


def tiny_bert_lora(
    layers: int = 2, hidden: int = 128, rank: int = 4, full: bool = False
) -> LoraClassifier:
    """A 2-layer BERT classifier with rank-``rank`` LoRA adapters (``full``: no adapters,
    every parameter trains: the baseline the adapters' bytes are compared with)."""
    # Imported here: the coordinator and workers that never build this model skip them. peft
    # 0.21 calls an attribute transformers 5 deprecates (a FutureWarning, nothing to act on);
    # silenced only around these lines so test suites run with warnings as errors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _build(layers, hidden, rank, full)


def _build(layers: int, hidden: int, rank: int, full: bool) -> LoraClassifier:
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    # Set, not passed: transformers 5 takes num_labels only through untyped **kwargs.
    config.num_labels = 2
    base = BertForSequenceClassification(config)
    if full:
        return LoraClassifier(base)
    lora = LoraConfig(
        task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, target_modules=["query", "value"]
    )
    return LoraClassifier(get_peft_model(base, lora))


def make_task(
    n: int, *, length: int = 16, seed: int = 0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``n`` sequences of token ids (as float32, fedcore's shard format) and their labels:
    1 when the sequence holds the trigger token, half of them."""
    rng = np.random.default_rng(seed)
    x = rng.integers(4, VOCAB, size=(n, length))
    y = rng.integers(0, 2, size=n)
    where = rng.integers(0, length, size=n)
    x[y == 1, where[y == 1]] = TRIGGER
    return x.astype(np.float32), y.astype(np.int64)
