"""Documents inside packed windows: which document each token belongs to, and its position within it.

A window of the packed stream holds the end of one document, whole documents, and the start of another;
every document ends with EOS. With ``data.document_mask=true`` the collate functions add, from the EOS
positions alone (pure functions, no randomness):

- ``doc_ids`` (batch, seq): the document of each token, numbered from 0 in each row: the number of EOS
  tokens before it (an EOS belongs to the document it ends); -1 at window padding;
- ``position_ids`` (batch, seq), with ``data.document_positions=reset`` only: the token's index within its
  document's part of the row, so RoPE positions restart at 0 at every document start.

The model turns ``doc_ids`` into its attention mask (`llmforge.models.transformer.document_mask`): a dense
boolean mask on CPU, a flex-attention block mask on CUDA (built on the device, where it is used; a
DataLoader worker cannot build it).
"""

from __future__ import annotations

import numpy as np
import torch


def document_ids(tokens: np.ndarray, eos_id: int, valid: np.ndarray | None = None) -> np.ndarray:
    """(batch, seq) token ids -> (batch, seq) document index per row; -1 where ``valid`` is False."""
    is_eos = tokens == eos_id
    docs = np.cumsum(is_eos, axis=1) - is_eos
    return docs if valid is None else np.where(valid, docs, -1)


def document_positions(doc_ids: np.ndarray) -> np.ndarray:
    """Index of each token within its run of equal ``doc_ids`` (its document's part of the row)."""
    idx = np.broadcast_to(np.arange(doc_ids.shape[1]), doc_ids.shape)
    starts = np.ones(doc_ids.shape, dtype=bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)


def document_batch(doc_ids: np.ndarray, reset_positions: bool, prefix: str = "") -> dict[str, torch.Tensor]:
    """The batch entries for ``doc_ids``: ``{prefix}doc_ids`` and, to reset RoPE, ``{prefix}position_ids``."""
    out = {f"{prefix}doc_ids": torch.from_numpy(np.ascontiguousarray(doc_ids, dtype=np.int64))}
    if reset_positions:
        out[f"{prefix}position_ids"] = torch.from_numpy(document_positions(doc_ids).astype(np.int64))
    return out
