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
    mup: bool = False  # maximal-update parameterisation (width transfer), see `width_mult`
    mup_base_width: int = 256  # the d_model at which µP equals the standard parameterisation

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
        if self.mup and self.mup_base_width < 1:
            raise ValueError(f"model.mup_base_width must be >= 1, got {self.mup_base_width}")

    @property
    def width_mult(self) -> float:
        """µP's width multiplier m = d_model / mup_base_width (1 without µP). With µP (Tensor Programs V,
        Adam): hidden matrices (those inside the blocks) are initialised with std / sqrt(m) and trained with
        LR / m (`llmforge.objectives.base.param_groups`); the embedding, norms and head keep std and LR;
        the logits are multiplied by 1 / m; attention scores are scaled by 1 / sqrt(head_dim * m), i.e.
        1 / head_dim up to the base's constant when the width grows at a fixed number of heads. At
        d_model = mup_base_width all of this is the standard parameterisation, exactly."""
        return self.d_model / self.mup_base_width if self.mup else 1.0

    @property
    def attention_scale(self) -> float | None:
        """Scale of the attention scores: None (1 / sqrt(head_dim)) without µP."""
        return (self.head_dim * self.width_mult) ** -0.5 if self.mup else None

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
