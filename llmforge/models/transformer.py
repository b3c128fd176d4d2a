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

Incremental decoding (`KVCache`, ``Transformer.forward(tokens, cache=...)``): preallocated key/value buffers
per layer, so each new token costs one position, not the whole prefix. Rows may be left-padded: the cache
keeps a key-validity mask, and ``positions`` gives each token its RoPE position within its own row.
The training path (``cache=None``) is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# torch-free, so that composing a config never imports torch; importable from here as before
from llmforge.models.config import TransformerConfig

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
        share = 1 if predicted is None or not seq_len else predicted / seq_len
        return 6.0 * (trunk + head * share) + 12.0 * cfg.n_layers * d * seq_len
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
    """x: (batch, heads, seq, head_dim) with cos/sin (seq, head_dim); or any layout they broadcast to, e.g.
    x (batch, seq, heads, head_dim) with cos/sin (seq, 1, head_dim) or, per row, (batch, seq, 1, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)  # a split, not two slices: its backward is one cat, not zero-fills
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(batch, seq) with 1/True at real tokens -> a boolean SDPA mask (batch, 1, 1, seq) over the keys."""
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


# On CPU in bf16/fp16, PyTorch's fused (flash) attention kernel is slower than two matmuls and a softmax up to
# a few hundred tokens (measured on AMX, torch 2.13, forward + backward: 232 tokens 1.2x, causal 256 tokens
# 1.5x, decoder-length causal 52 tokens 3.8x; at 512 tokens the fused kernel wins): there, attention is
# computed explicitly (fp32 softmax). fp32 on CPU and every GPU case use the fused kernel.
EXPLICIT_ATTENTION_MAX_LEN = 256


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | BlockMask | None,
    causal: bool,
    scale: float | None = None,
):
    """Attention over (batch, heads, seq, head_dim), expanding grouped K/V heads; mask: True = may attend,
    or a flex-attention `BlockMask` (`document_mask` on CUDA), which holds any causality itself.
    ``scale``: of the scores, default 1/sqrt(head_dim)."""
    if isinstance(mask, BlockMask):
        return flex_attend(q, k, v, mask, scale)
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    t, s = q.shape[2], k.shape[2]
    if mask is not None and causal:
        mask = mask & torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
        causal = False
    explicit = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
    if not explicit or max(t, s) > EXPLICIT_ATTENTION_MAX_LEN:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


# -- document masking ------------------------------------------------------------------------------------
# Packed windows hold several documents. With ``doc_ids`` (batch, seq) a query attends only to keys of its
# own document (and, causally, to earlier ones). Padding has document id -1: it attends to padding only,
# and a padding query of cross-attention to every key (its output is never scored), so no row is empty.
_compiled: dict[str, Callable] = {}


def _flex(name: str) -> Callable:
    """flex_attention / create_block_mask, compiled once on CUDA (eager flex attention is a slow
    reference implementation; on CPU it runs forward only, which the tests use)."""
    if name not in _compiled:
        fn = {"attention": flex_attention, "block_mask": create_block_mask}[name]
        _compiled[name] = torch.compile(fn, dynamic=False) if torch.cuda.is_available() else fn
    return _compiled[name]


def flex_attend(q, k, v, mask: BlockMask, scale: float | None) -> torch.Tensor:
    fn = _flex("attention") if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def document_mask(
    q_doc: torch.Tensor, k_doc: torch.Tensor, causal: bool, flex: bool | None = None
) -> torch.Tensor | BlockMask:
    """The attention mask of packed documents: query i may see key j when both are in the same document
    (``q_doc[b, i] == k_doc[b, j]``) and, if ``causal``, j <= i; a padding query (id < 0) of
    cross-attention sees every key. ``flex`` (default: on CUDA) gives a flex-attention `BlockMask` (memory
    O(seq^2 / 128^2), the fast kernels skip whole blocks); otherwise a dense boolean (batch, 1, t, s) for
    SDPA (on CPU SDPA takes it at about the cost of the causal kernel at a few hundred tokens)."""
    cross = q_doc is not k_doc
    if q_doc.is_cuda if flex is None else flex:

        def mask_mod(b, h, i, j):
            same = q_doc[b, i] == k_doc[b, j]
            if causal:
                same = same & (j <= i)
            return same | (q_doc[b, i] < 0) if cross else same

        b, t, s = q_doc.shape[0], q_doc.shape[1], k_doc.shape[1]
        make = _flex("block_mask") if q_doc.is_cuda else create_block_mask
        return make(mask_mod, b, None, t, s, device=q_doc.device)
    mask = q_doc[:, None, :, None] == k_doc[:, None, None, :]
    if causal:
        t, s = q_doc.shape[1], k_doc.shape[1]
        mask = mask & torch.ones(t, s, dtype=torch.bool, device=q_doc.device).tril()
    if cross:
        mask = mask | (q_doc < 0)[:, None, :, None]
    return mask


class Attention(nn.Module):
    """Self-attention with RoPE; causal (decoder) or bidirectional (encoder), optional key padding mask."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.scale = cfg.attention_scale
        kv = cfg.kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        causal: bool,
        mask: torch.Tensor | BlockMask | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """cos/sin: (t, head_dim), or (b, t, head_dim) for per-row positions. ``cache``: this layer's
        (keys, values) buffers (b, kv_heads, max_len, head_dim); the new keys and values are written at
        ``start`` and the queries attend to everything up to ``start + t``."""
        b, t, d = x.shape
        kv = self.kv_heads * self.head_dim
        qk, v = self.qkv(x).split([d + kv, kv], dim=-1)
        # RoPE on the Q and K heads together, (b, t, heads, head_dim): one set of elementwise ops, not two
        qk = qk.view(b, t, self.n_heads + self.kv_heads, self.head_dim)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over the heads
        q, k = apply_rope(qk, cos, sin).split([self.n_heads, self.kv_heads], dim=2)
        v = v.view(b, t, self.kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k_buf, v_buf = cache
            k_buf[:, :, start : start + t] = k
            v_buf[:, :, start : start + t] = v
            k, v = k_buf[:, :, : start + t], v_buf[:, :, : start + t]
        y = attend(q, k, v, mask, causal, self.scale)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class CrossAttention(nn.Module):
    """Decoder queries over the encoder's output (``memory``). No RoPE: the memory carries its positions."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.scale = cfg.attention_scale
        kv = cfg.kv_heads * cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * kv, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | BlockMask | None = None
    ) -> torch.Tensor:
        b, t, d = x.shape
        s = memory.shape[1]
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(memory).view(b, s, 2 * self.kv_heads, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        y = attend(q, k, v, mask, causal=False, scale=self.scale)
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
    """Pre-norm self-attention + SwiGLU: the block of the decoder-only model and of every encoder."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        causal: bool,
        mask: torch.Tensor | BlockMask | None = None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, causal, mask, cache, start)
        return x + self.mlp(self.mlp_norm(x))


class DecoderBlock(nn.Module):
    """Encoder-decoder's decoder block: causal self-attention, cross-attention, SwiGLU (each pre-norm)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.cross = CrossAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        memory_mask: torch.Tensor | BlockMask | None = None,
        self_mask: torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        """``self_mask``: a document mask that holds the causal mask too (`document_mask`), or None."""
        x = x + self.attn(self.attn_norm(x), cos, sin, self_mask is None, self_mask)
        x = x + self.cross(self.cross_norm(x), memory, memory_mask)
        return x + self.mlp(self.mlp_norm(x))


def init_weights(model: nn.Module, std: float, residual_std: dict[str, float], hidden: float = 1.0) -> None:
    """Normal(0, std) for every matrix; a residual projection (``...attn.out``, ``...cross.out``,
    ``...mlp.down``) under a name prefix of ``residual_std`` (a stack of blocks) gets that std. Every matrix
    of those stacks is multiplied by ``hidden`` (µP: 1 / sqrt(width_mult)). Norm weights stay at one."""
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        prefix = next((k for k in residual_std if name.startswith(k)), None)
        if prefix is None:  # embedding, head
            nn.init.normal_(p, mean=0.0, std=std)
            continue
        scaled = name.endswith(("attn.out.weight", "cross.out.weight", "mlp.down.weight"))
        nn.init.normal_(p, mean=0.0, std=(residual_std[prefix] if scaled else std) * hidden)


def output_mult(cfg: TransformerConfig) -> float:
    """Multiplier of the logits: 1 / width_mult under µP, else 1."""
    return 1.0 / cfg.width_mult


def apply_head(linear: nn.Linear, x: torch.Tensor, head: bool | Callable = True):
    """The end of every model's forward. ``head=True``: the logits ``linear(x)``; ``False``: the head's input
    ``x`` (the final norm's output); a callable: ``head(x, linear)``, e.g. a loss that uses the head's
    weight chunk by chunk (`llmforge.objectives.loss`), run inside the forward, where FSDP has gathered it."""
    if callable(head):
        return head(x, linear)
    return linear(x) if head else x


class Transformer(nn.Module):
    """Decoder-only language model: token ids (batch, seq) -> logits (batch, seq, vocab)."""

    causal: bool = True
    flex_attention: bool | None = None  # document masks as flex-attention block masks; None: on CUDA

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
        """Normal(0, init_std) everywhere; residual projections scaled by 1/sqrt(2 * n_layers); µP: the
        blocks' matrices by 1/sqrt(width_mult) too."""
        std = self.cfg.init_std
        hidden = self.cfg.width_mult**-0.5
        init_weights(self, std, {"blocks.": std / math.sqrt(2 * self.cfg.n_layers)}, hidden)
        reset_rope(self, self.cfg)

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the head multiplies: the final norm of the residual stream (times µP's output multiplier)."""
        x = self.norm(x)
        return x if self.cfg.width_mult == 1.0 else x * output_mult(self.cfg)

    def rope(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_slice(self, t)

    def trunk(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embedding and blocks: the residual stream (batch, seq, d_model), before the final norm.

        ``position_ids`` (batch, seq): RoPE positions (default 0, 1, ...); ``doc_ids`` (batch, seq): the
        document of every token of packed windows (-1: padding), attention stays inside a document
        (`document_mask`); it replaces ``attention_mask``."""
        cos, sin = rope_table(self, tokens.shape[1], position_ids)
        causal, mask = self.causal, key_mask(attention_mask)
        if doc_ids is not None:
            causal, mask = False, document_mask(doc_ids, doc_ids, self.causal, self.flex_attention)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, causal, mask)
        return x

    def trunk_cached(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The residual stream of ``tokens`` (batch, t) appended after the ``cache.length`` positions already
        in the cache (causal only). ``positions`` (batch, t): RoPE positions (default: the slot indices);
        ``attention_mask`` (batch, t): 0 at padding, which no later token attends to."""
        if not self.causal:
            raise ValueError("a KV cache needs a causal model")
        b, t = tokens.shape
        start = cache.length
        end = start + t
        if end > cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} positions cannot take {end}")
        if positions is None:
            positions = torch.arange(start, end, device=tokens.device).expand(b, t)
        last = int(positions.max())
        if last >= self.cfg.max_seq_len:
            raise ValueError(f"position {last} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cache.valid[:, start:end] = True if attention_mask is None else attention_mask.bool()
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (b, t, head_dim)
        mask = cache.mask(start, t)
        x = self.embed(tokens)
        for block, layer_cache in zip(self.blocks, cache.layers(), strict=True):
            x = block(x, cos, sin, False, mask, layer_cache, start)
        cache.length = end
        return x

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        head: bool | Callable = True,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab). With a ``cache``: incremental decoding (`trunk_cached`); without,
        ``positions`` and ``doc_ids`` are those of `trunk` (packed documents). ``head``: see `apply_head`."""
        if cache is None:
            x = self.trunk(tokens, position_ids=positions, doc_ids=doc_ids)
        else:
            x = self.trunk_cached(tokens, cache, positions, attention_mask)
        return apply_head(self.head, self.head_input(x), head)


class KVCache:
    """Preallocated keys and values of every layer of a causal `Transformer`, for incremental decoding.

    ``k``/``v``: (layers, batch, kv_heads, max_len, head_dim); ``valid`` (batch, max_len): which slots hold
    real tokens (left padding does not); ``length``: slots filled so far.
    """

    def __init__(
        self,
        cfg: TransformerConfig,
        batch: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.max_len, self.length = max_len, 0

    @classmethod
    def for_model(cls, model: Transformer, batch: int, max_len: int) -> KVCache:
        p = model.head.weight
        return cls(model.cfg, batch, max_len, dtype=p.dtype, device=p.device)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.k[i], self.v[i]) for i in range(self.k.shape[0])]

    def mask(self, start: int, t: int) -> torch.Tensor | None:
        """SDPA mask (batch, 1, t, start + t), True = may attend: causal over the slots, valid keys only;
        a query always sees itself (a padding query would otherwise see nothing and give NaN). None when
        every key may be seen (one new token, no padding)."""
        end = start + t
        valid = self.valid[:, :end]
        if t == 1 and bool(valid.all()):
            return None
        dev = valid.device
        slot = torch.arange(end, device=dev)
        query = torch.arange(start, end, device=dev)[:, None]
        causal = slot[None, :] <= query  # (t, end)
        return causal & (valid[:, None, None, :] | (slot[None, :] == query))


def rope_slice(model: nn.Module, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first t rows of a model's cos/sin buffers."""
    if t > model.cfg.max_seq_len:
        raise ValueError(f"sequence length {t} exceeds model.max_seq_len={model.cfg.max_seq_len}")
    return model.rope_cos[:t], model.rope_sin[:t]


def rope_table(
    model: nn.Module, t: int, position_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of positions 0..t-1 (t, head_dim), or of ``position_ids`` (batch, t) per row."""
    if position_ids is None:
        return rope_slice(model, t)
    return model.rope_cos[position_ids], model.rope_sin[position_ids]


def reset_rope(model: nn.Module, cfg: TransformerConfig) -> None:
    if not model.rope_cos.is_meta:
        cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)


class Encoder(Transformer):
    """Bidirectional encoder with an MLM head (BERT's objective on `Transformer`'s parameters).

    ``attention_mask`` (batch, seq), 1 at real tokens, hides padding from every query. ``positions``: flat
    indices into (batch * seq) of the tokens to predict; the head then runs on those rows only and the
    result is (len(positions), vocab): with 15% of the tokens masked, most of the head's matmul is saved.
    """

    causal = False

    def forward(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        head: bool | Callable = True,
    ) -> torch.Tensor:
        """``position_ids``, ``doc_ids``: RoPE positions and packed documents, as in `Transformer.trunk`.
        ``head``: see `apply_head`."""
        x = self.trunk(tokens, attention_mask, position_ids, doc_ids)
        if positions is not None:
            x = x.flatten(0, 1).index_select(0, positions)
        return apply_head(self.head, self.head_input(x), head)


class EncoderDecoder(nn.Module):
    """T5-style encoder-decoder: (inputs (batch, s), decoder inputs (batch, t)) -> logits (batch, t, vocab).

    ``n_layers`` encoder `Block`s (bidirectional) and a final norm; ``decoder_layers`` `DecoderBlock`s
    (causal self-attention, cross-attention to the normed encoder output, SwiGLU) and a final norm; one
    embedding shared by both stacks, and the head (tied to it if ``tie_embeddings``).
    """

    flex_attention: bool | None = None  # as `Transformer.flex_attention`

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is unset: give it, or let the trainer take it from the data")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.decoder_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std); residual projections scaled by 1/sqrt(residual branches in their stack):
        2 per encoder block, 3 per decoder block."""
        std = self.cfg.init_std
        residual = {
            "encoder.": std / math.sqrt(2 * self.cfg.n_layers),
            "decoder.": std / math.sqrt(3 * self.cfg.decoder_layers),
        }
        init_weights(self, std, residual, self.cfg.width_mult**-0.5)
        reset_rope(self, self.cfg)

    head_input = Transformer.head_input  # the final norm of the decoder (times µP's output multiplier)
    rope = Transformer.rope

    def encode(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cos, sin = rope_table(self, tokens.shape[1], position_ids)
        mask = key_mask(attention_mask)
        if doc_ids is not None:
            mask = document_mask(doc_ids, doc_ids, False, self.flex_attention)
        x = self.embed(tokens)
        for block in self.encoder:
            x = block(x, cos, sin, False, mask)
        return self.encoder_norm(x)

    def decode(
        self,
        decoder_tokens: torch.Tensor,
        memory: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        memory_doc_ids: torch.Tensor | None = None,
        head: bool | Callable = True,
    ) -> torch.Tensor:
        """``doc_ids`` (batch, t) of the decoder tokens and ``memory_doc_ids`` (batch, s) of the encoder's:
        causal self-attention within a document, cross-attention to the same document's encoder tokens.
        ``head``: see `apply_head`."""
        cos, sin = rope_table(self, decoder_tokens.shape[1], position_ids)
        self_mask, memory_mask = None, key_mask(attention_mask)
        if doc_ids is not None:
            if memory_doc_ids is None:
                raise ValueError("decoder doc_ids need the encoder's memory_doc_ids")
            self_mask = document_mask(doc_ids, doc_ids, True, self.flex_attention)
            memory_mask = document_mask(doc_ids, memory_doc_ids, False, self.flex_attention)
        x = self.embed(decoder_tokens)
        for block in self.decoder:
            x = block(x, memory, cos, sin, memory_mask, self_mask)
        return apply_head(self.head, self.head_input(x), head)

    def forward(
        self,
        tokens: torch.Tensor,
        decoder_tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        decoder_position_ids: torch.Tensor | None = None,
        decoder_doc_ids: torch.Tensor | None = None,
        head: bool | Callable = True,
    ) -> torch.Tensor:
        """``attention_mask`` (batch, s): 1 at real input tokens; hides input padding from both stacks.
        ``position_ids``/``doc_ids`` and their ``decoder_`` twins: packed documents (`decode`). ``head``: see
        `apply_head`."""
        memory = self.encode(tokens, attention_mask, position_ids, doc_ids)
        return self.decode(
            decoder_tokens, memory, attention_mask, decoder_position_ids, decoder_doc_ids, doc_ids, head
        )
