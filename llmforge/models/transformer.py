"""The llmforge transformer: one readable, torch-only file.

A pre-norm decoder in the Llama family: RMSNorm, rotary position embeddings (RoPE), SwiGLU MLP,
``F.scaled_dot_product_attention``, optional grouped-query attention and weight tying, and a scaled
initialisation of the residual projections (GPT-2 / Megatron: std / sqrt(number of residual branches)).

Three architectures share the same blocks and the same `TransformerConfig`:

- `Transformer`: decoder-only causal LM (GPT / Llama), for ``objective=clm``;
- `Encoder`: the same stack without the causal mask and an MLM head (BERT), for ``objective=mlm``; it can
  compute logits at the masked positions only;
- `EncoderDecoder`: an encoder stack and a decoder stack whose blocks add cross-attention to the encoder's
  output (T5), one embedding shared by both, for ``objective=denoise``. Self-attention uses RoPE in both
  stacks; cross-attention has none (the encoder states already carry their positions).

A size preset (``conf/model/*.yaml``) describes one stack: ``n_layers`` blocks of ``d_model`` width. The
encoder uses it as is (``model=125m`` is a BERT-base-shaped encoder, the same parameter count as the
decoder); the encoder-decoder has ``n_layers`` encoder blocks and ``n_decoder_layers`` decoder blocks
(default: ``n_layers`` too, T5's convention: T5-base is two BERT-base-sized stacks). Its parameter count is
about twice the preset's name, its compute per token about the same as the decoder's, because targets are
short. Set ``model.n_decoder_layers`` (and ``model.n_layers``) to split a budget differently.

Q, K and V are one fused projection, and so are the SwiGLU gate and up projections (and cross-attention's
K and V): one large matmul is faster than several small ones, most of all on CPU. The weights split back into
Llama's separate matrices on export. Nothing here imports Lightning, Hydra or torch.distributed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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


ARCHITECTURES = ("decoder", "encoder", "encdec")


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not one of {', '.join(ARCHITECTURES)}")


def _block_params(cfg: TransformerConfig) -> tuple[int, int]:
    """(self-attention + SwiGLU block, cross-attention sub-layer with its norm) parameter counts."""
    d, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
    attn = d * (d + 2 * kv) + d * d
    mlp = 3 * d * cfg.hidden
    block = attn + mlp + 2 * d  # two RMSNorm weights
    cross = d * d + d * 2 * kv + d * d + d  # q, fused kv, out, and its RMSNorm
    return block, cross


def num_params(cfg: TransformerConfig, *, include_embedding: bool = True, arch: str = "decoder") -> int:
    """Exact parameter count from the config alone (checked against the modules in the tests).

    ``arch``: ``decoder`` (`Transformer`), ``encoder`` (`Encoder`: the same parameters) or ``encdec``
    (`EncoderDecoder`: encoder blocks and norm, decoder blocks with cross-attention and norm, one shared
    embedding, the head).
    """
    _check_arch(arch)
    if cfg.vocab_size is None:
        raise ValueError("num_params needs model.vocab_size")
    d = cfg.d_model
    block, cross = _block_params(cfg)
    body = cfg.n_layers * block + d  # final norm
    if arch == "encdec":
        body += cfg.decoder_layers * (block + cross) + d  # decoder blocks and their final norm
    emb = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return body + head + (emb if include_embedding else 0)


def flops_per_token(
    cfg: TransformerConfig,
    seq_len: int,
    *,
    arch: str = "decoder",
    target_len: int = 0,
    predicted: int | None = None,
) -> float:
    """Training FLOPs per (input) token, forward + backward, the PaLM appendix-B formula.

    6 * N for every weight matmul (N excludes the embedding lookup, includes the output head, which is a
    matmul even when tied, and, by the PaLM convention, the norm weights) plus 12 * n_layers * d_model *
    seq_len for the attention scores and the weighted sum (not halved for the causal mask, as in PaLM and
    Chinchilla's accounting).

    ``decoder`` and ``encoder`` cost the same; ``predicted`` is the number of the ``seq_len`` positions whose
    logits are computed (default all; the MLM objective computes them at the masked positions only).
    ``encdec``: everything one example of ``seq_len`` encoder inputs and ``target_len`` decoder inputs costs,
    divided by ``seq_len``: the encoder on the inputs, the decoder and the head on the targets, the
    cross-attention K/V projections on the inputs, its scores on targets x inputs.
    """
    _check_arch(arch)
    if cfg.vocab_size is None:
        raise ValueError("flops_per_token needs model.vocab_size")
    d, head = cfg.d_model, cfg.vocab_size * cfg.d_model
    block, cross = _block_params(cfg)
    if arch != "encdec":
        trunk = cfg.n_layers * block + d  # blocks and final norm
        positions = seq_len if predicted is None else predicted
        total = 6.0 * (trunk * seq_len + head * positions) + 12.0 * cfg.n_layers * d * seq_len * seq_len
        return total / seq_len if seq_len else 6.0 * (trunk + head)
    kv = 2 * d * cfg.kv_heads * cfg.head_dim  # cross-attention K/V projection: runs on the inputs
    layers = cfg.decoder_layers
    encoder = 6.0 * (cfg.n_layers * block + d + layers * kv) * seq_len
    decoder = 6.0 * (layers * (block + cross - kv) + d + head) * target_len
    attention = 12.0 * d * (
        cfg.n_layers * seq_len * seq_len + layers * (target_len * target_len + target_len * seq_len)
    )
    return (encoder + decoder + attention) / max(seq_len, 1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(F, "rms_norm"):  # torch >= 2.4: one fused kernel
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cache(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (max_len, head_dim) in Llama's "rotate half" layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos/sin: (seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        kv = cfg.kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal: bool) -> torch.Tensor:
        b, t, d = x.shape
        kv = self.kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([d, kv, kv], dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_heads != self.n_heads:
            rep = self.n_heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.hidden = cfg.hidden
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, causal)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only language model: token ids (batch, seq) -> logits (batch, seq, vocab)."""

    causal: bool = True

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is unset: give it, or let the trainer take it from the data")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual projections scaled by 1/sqrt(2 * n_layers)."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm weights stay at one
            scaled = name.endswith("attn.out.weight") or name.endswith("mlp.down.weight")
            nn.init.normal_(p, mean=0.0, std=residual_std if scaled else std)
        if not self.rope_cos.is_meta:
            cos, sin = rope_cache(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, self.causal)
        return self.head(self.norm(x))
