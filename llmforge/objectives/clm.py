"""Causal language modelling: predict token t+1 from tokens <= t (shift-by-one cross-entropy)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from llmforge.models.transformer import Transformer
from llmforge.objectives.base import PretrainModule
from llmforge.objectives.loss import IGNORE_INDEX


def clm_collate(samples: list[dict], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Windows of seq_len + 1 tokens -> inputs (first seq_len) and labels (last seq_len).

    Window padding (negative ids) becomes PAD in the inputs and an ignored label.
    """
    windows = torch.from_numpy(np.stack([s["tokens"] for s in samples]))
    inputs, labels = windows[:, :-1].clone(), windows[:, 1:].clone()
    inputs[inputs < 0] = pad_id
    labels[labels < 0] = IGNORE_INDEX
    return {
        "input_ids": inputs,
        "labels": labels,
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
    }


class CausalLM(PretrainModule):
    def build_model(self) -> nn.Module:
        return Transformer(self.model_cfg)

    def collate_fn(self) -> Callable[[list[dict]], dict]:
        return partial(clm_collate, pad_id=self.special_tokens["pad"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def loss(self, batch: dict) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        result = self.model(batch["input_ids"], head=self.head_loss(batch["labels"]))
        return result.loss, int(result.count), self.loss_metrics(result)
