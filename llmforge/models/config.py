"""The model's shape, `TransformerConfig`: plain data, no torch, so configs can be composed and checked
(`llmforge.config`) by processes that never build a model, such as the data stage's workers.
`llmforge.models.transformer` re-exports it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TransformerConfig:
    """Shape of the model. ``vocab_size=None`` means: take it from the data's manifest."""

    name: str = "custom"
    vocab_size: int | None = None
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads (plain multi-head attention)
    ffn_hidden: int | None = None  # None: 8/3 * d_model rounded up to `multiple_of`
    multiple_of: int = 64
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    n_decoder_layers: int | None = None  # encoder-decoder only; None: as many as n_layers

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for RoPE")
        if self.n_decoder_layers is not None and self.n_decoder_layers < 1:
            raise ValueError(f"model.n_decoder_layers must be >= 1 (or null), got {self.n_decoder_layers}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers or self.n_layers

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        raw = int(8 * self.d_model / 3)
        return self.multiple_of * math.ceil(raw / self.multiple_of)
