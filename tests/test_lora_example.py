"""The LoRA example's model: peft leaves only the adapters and the head trainable, and they
are at most 2% of the bytes full fine-tuning moves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fedcore.frozen import FROM_MODEL, trainable_names
from fedcore.models import get_weights

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from lora_model import make_task, tiny_bert_lora


@pytest.mark.slow
def test_only_adapters_and_head_train_and_they_are_small() -> None:
    model = tiny_bert_lora()
    weights = get_weights(model)
    names = trainable_names(model, [FROM_MODEL])
    assert names
    assert all("lora_" in n or "modules_to_save" in n for n in names), names
    full = sum(a.nbytes for a in get_weights(tiny_bert_lora(full=True)).values())
    assert sum(weights[n].nbytes for n in names) <= 0.02 * full
    logits = model(torch.from_numpy(make_task(4)[0]))
    assert tuple(logits.shape) == (4, 2)
