"""Causal language modelling: predict token t+1 from tokens <= t (shift-by-one cross-entropy)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from llmforge.data.documents import document_batch, document_ids
from llmforge.models.transformer import Transformer
from llmforge.objectives.base import PretrainModule
from llmforge.objectives.loss import IGNORE_INDEX


def clm_collate(
    samples: list[dict], *, pad_id: int, document_eos_id: int | None = None, reset_positions: bool = False
) -> dict[str, torch.Tensor]:
    """Windows of seq_len + 1 tokens -> inputs (first seq_len) and labels (last seq_len).

    Window padding (negative ids) becomes PAD in the inputs and an ignored label. With ``document_eos_id``
    (``data.document_mask``): ``doc_ids`` and, with ``reset_positions``, ``position_ids`` of the inputs
    (`llmforge.data.documents`). The label of an EOS input stays the next document's first token.
    """
    stacked = np.stack([s["tokens"] for s in samples])
    windows = torch.from_numpy(stacked)
    inputs, labels = windows[:, :-1].clone(), windows[:, 1:].clone()
    inputs[inputs < 0] = pad_id
    labels[labels < 0] = IGNORE_INDEX
    batch = {
        "input_ids": inputs,
        "labels": labels,
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
    }
    if document_eos_id is not None:
        docs = document_ids(stacked[:, :-1], document_eos_id, stacked[:, :-1] >= 0)
        batch.update(document_batch(docs, reset_positions))
    return batch


class CausalLM(PretrainModule):
    def build_model(self) -> nn.Module:
        return Transformer(self.model_cfg)

    def collate_fn(self) -> Callable[[list[dict]], dict]:
        return partial(clm_collate, pad_id=self.special_tokens["pad"], **self.document_options())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def loss(self, batch: dict) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        documents = {"positions": batch.get("position_ids"), "doc_ids": batch.get("doc_ids")}
        result = self.model(batch["input_ids"], **documents, head=self.head_loss(batch["labels"]))
        return result.loss, int(result.count), self.loss_metrics(result)
