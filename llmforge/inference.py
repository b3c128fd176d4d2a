"""Reading what a model writes: sampling, KV-cache decoding, fill-mask and span filling.

Used by ``python -m llmforge.generate``, the `llmforge.callbacks.SampleText` callback and anything else that
wants text from a model (`llmforge.checkpoints.load_model` gives a `LoadedModel` from a checkpoint):

- `Sampling`, `next_tokens`, `make_generator`: greedy, or temperature / top-k / top-p from a local seeded
  generator (the global RNG is never touched);
- causal LM, `generate_ids` / `generate_text`: a batch of prompts left-padded, each row with its own RoPE
  positions and key mask (a prompt gives the same greedy tokens alone or in a batch), a KV cache
  (`llmforge.models.transformer.KVCache`) so that each new token costs one position (``use_cache=False``
  recomputes the whole prefix every step, for comparison), stopping at EOS;
- masked LM, `fill_mask_ids` / `fill_mask`: the top-k candidates of every ``<mask>``;
- denoising, `decode_ids` / `split_spans` / `fill_spans`: the encoder reads the prompt (+ EOS, as in
  training), the decoder writes the target (sentinel, span, sentinel, span, ..., EOS) and each sentinel's
  span is cut out of it; a ``variant=infill`` model writes the whole text back instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmforge.checkpoints import LoadedModel
from llmforge.models.transformer import Encoder, EncoderDecoder, KVCache, Transformer

__all__ = [
    "LoadedModel",
    "Sampling",
    "decode",
    "decode_ids",
    "encode",
    "fill_mask",
    "fill_mask_ids",
    "fill_spans",
    "generate_ids",
    "generate_text",
    "make_generator",
    "next_tokens",
    "split_spans",
]


# -- sampling --------------------------------------------------------------------------------------
# names of the dtypes a model can run in for inference (--dtype, model_args dtype=)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

@dataclass
class Sampling:
    """temperature <= 0: greedy (argmax). Otherwise logits / temperature, then top-k (0: off) and top-p
    (nucleus; 1.0: off) filtering, then one draw from a seeded generator."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def next_tokens(
    logits: torch.Tensor,
    sampling: Sampling,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """(batch, vocab) logits -> (batch,) token ids."""
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > sampling.top_p  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A local generator: sampling never touches the global RNG (training streams stay as they are)."""
    return torch.Generator(device=device).manual_seed(seed)


# -- causal LM -------------------------------------------------------------------------------------
@torch.no_grad()
def generate_ids(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    sampling: Sampling | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (token ids), up to ``max_new_tokens``; a row ends after its first EOS
    (which it includes). Rows are left-padded to the longest prompt; RoPE positions and the key mask are
    per row, so a row's greedy tokens do not depend on the others."""
    if not isinstance(model, Transformer) or not model.causal:
        raise ValueError("generate_ids needs a causal Transformer (objective=clm)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    sampling = sampling or Sampling()
    device = model.head.weight.device
    b, width = len(prompts), max(len(p) for p in prompts)
    total = width + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len="
            f"{model.cfg.max_seq_len}"
        )
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = True
    tokens, mask = tokens.to(device), mask.to(device)
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    next_pos = mask.long().sum(dim=1, keepdim=True)  # (b, 1): each row's next RoPE position
    padded = not bool(mask.all())
    generator = None if sampling.greedy else make_generator(seed, device)

    def last_logits(hidden: torch.Tensor) -> torch.Tensor:
        return model.head(model.head_input(hidden[:, -1]))  # the head on the last position only

    def full_pass(seq: torch.Tensor, seq_mask: torch.Tensor) -> torch.Tensor:
        """No cache: the whole prefix again (the training forward; a fresh cache when rows are padded)."""
        if not padded:
            return last_logits(model.trunk(seq))
        fresh = KVCache.for_model(model, b, seq.shape[1])
        pos = (seq_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return last_logits(model.trunk_cached(seq, fresh, pos, seq_mask))

    cache = KVCache.for_model(model, b, total) if use_cache else None
    if cache is not None:
        logits = last_logits(model.trunk_cached(tokens, cache, positions, mask if padded else None))
    else:
        logits = full_pass(tokens, mask)
    out = torch.empty(b, 0, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        new = next_tokens(logits, sampling, generator, vocab_limit)
        out = torch.cat([out, new[:, None]], dim=1)
        if eos_id is not None:
            done |= new == eos_id
            if bool(done.all()):
                break
        if step == max_new_tokens - 1:
            break
        if cache is not None:
            logits = last_logits(model.trunk_cached(new[:, None], cache, next_pos))
            next_pos = next_pos + 1
        else:
            tokens = torch.cat([tokens, new[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
            logits = full_pass(tokens, mask)
    rows = out.tolist()
    if eos_id is not None:
        rows = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]
    return rows


# -- masked LM -------------------------------------------------------------------------------------
@torch.no_grad()
def fill_mask_ids(
    model: Encoder,
    ids: list[int],
    mask_id: int,
    top_k: int = 5,
    exclude: list[int] | None = None,
    vocab_limit: int | None = None,
) -> list[list[tuple[int, float]]]:
    """For each ``mask_id`` position of ``ids`` (in order): the ``top_k`` (token id, probability) candidates.
    ``exclude``: ids never proposed (special tokens: they are never training targets)."""
    if not isinstance(model, Encoder):
        raise ValueError("fill-mask needs a masked-LM Encoder (objective=mlm)")
    tokens = torch.tensor([ids], dtype=torch.long, device=model.head.weight.device)
    where = (tokens[0] == mask_id).nonzero().flatten()
    if where.numel() == 0:
        raise ValueError("the prompt has no <mask> token to fill")
    logits = model(tokens, positions=where).float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")
    if exclude:
        logits[:, exclude] = float("-inf")
    probs = logits.softmax(dim=-1)
    values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [list(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(indices, values, strict=True)]


# -- denoising -------------------------------------------------------------------------------------
@torch.no_grad()
def decode_ids(
    model: EncoderDecoder,
    ids: list[int],
    *,
    start_id: int,
    eos_id: int,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    seed: int = 0,
    vocab_limit: int | None = None,
) -> list[int]:
    """The encoder reads ``ids``; the decoder writes from ``start_id`` until EOS (included) or
    ``max_new_tokens``. The target is short: the decoder runs on the whole target each step (no cache)."""
    if not isinstance(model, EncoderDecoder):
        raise ValueError("fill-span needs an EncoderDecoder (objective=denoise)")
    sampling = sampling or Sampling()
    device = model.head.weight.device
    memory = model.encode(torch.tensor([ids], dtype=torch.long, device=device))
    generator = None if sampling.greedy else make_generator(seed, device)
    target = torch.tensor([[start_id]], dtype=torch.long, device=device)
    limit = min(max_new_tokens, model.cfg.max_seq_len - 1)
    for _ in range(limit):
        logits = model.decode(target, memory)[:, -1]
        new = next_tokens(logits, sampling, generator, vocab_limit)
        target = torch.cat([target, new[:, None]], dim=1)
        if int(new) == eos_id:
            break
    return target[0, 1:].tolist()


def split_spans(target: list[int], sentinel_ids: list[int], eos_id: int) -> dict[int, list[int]]:
    """A span-corruption target (s_0 span_0 s_1 span_1 ... EOS) -> {sentinel index: span ids}. Tokens before
    the first sentinel are dropped; a sentinel the decoder wrote more than once keeps its first span."""
    index_of = {sid: i for i, sid in enumerate(sentinel_ids)}
    spans: dict[int, list[int]] = {}
    current: int | None = None
    for token in target:
        if token == eos_id:
            break
        if token in index_of:
            current = index_of[token] if index_of[token] not in spans else None
            if current is not None:
                spans[current] = []
        elif current is not None:
            spans[current].append(token)
    return spans


# -- text level ------------------------------------------------------------------------------------
def _tokenizer(lm: LoadedModel) -> Any:
    if lm.tokenizer is None:
        raise ValueError(
            "no tokenizer found for this checkpoint (its data.path has no tokenizer.json from here): "
            "pass --tokenizer path/to/tokenizer.json (or the data directory)"
        )
    return lm.tokenizer


def encode(lm: LoadedModel, text: str) -> list[int]:
    return _tokenizer(lm).encode(text).ids


def decode(lm: LoadedModel, ids: list[int]) -> str:
    return _tokenizer(lm).decode(ids, skip_special_tokens=True)


def generate_text(
    lm: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 64,
    *,
    sampling: Sampling | None = None,
    seed: int = 0,
    use_cache: bool = True,
    eos_prefix: bool = True,
) -> list[dict]:
    """Continue each prompt: [{"prompt", "completion", "tokens", "stopped_at_eos"}]."""
    eos = lm.special_tokens.get("eos")
    prefix = [eos] if eos_prefix and eos is not None else []
    ids = [prefix + encode(lm, p) for p in prompts]
    rows = generate_ids(
        lm.model,
        ids,
        max_new_tokens,
        sampling=sampling,
        seed=seed,
        eos_id=eos,
        pad_id=lm.special_tokens.get("pad", 0),
        use_cache=use_cache,
        vocab_limit=lm.vocab_limit,
    )
    return [
        {
            "prompt": p,
            "completion": decode(lm, row),
            "tokens": row,
            "stopped_at_eos": eos is not None and bool(row) and row[-1] == eos,
        }
        for p, row in zip(prompts, rows, strict=True)
    ]


def fill_mask(lm: LoadedModel, prompt: str, top_k: int = 5) -> dict:
    """{"prompt", "masks": [[{"token", "id", "prob"}, ...] per <mask>], "filled": prompt with the top-1s}."""
    mask_id = lm.special_tokens["mask"]
    ids = encode(lm, prompt)
    candidates = fill_mask_ids(
        lm.model,
        ids,
        mask_id,
        top_k,
        exclude=sorted(set(lm.special_tokens.values())),
        vocab_limit=lm.vocab_limit,
    )
    tok = _tokenizer(lm)
    filled, it = [], iter(candidates)
    for i in ids:
        filled.append(next(it)[0][0] if i == mask_id else i)
    masks = [[{"token": tok.decode([i]), "id": i, "prob": p} for i, p in c] for c in candidates]
    return {"prompt": prompt, "masks": masks, "filled": decode(lm, filled)}


def fill_spans(
    lm: LoadedModel,
    prompt: str,
    max_new_tokens: int = 64,
    *,
    sampling: Sampling | None = None,
    seed: int = 0,
) -> dict:
    """{"prompt", "spans": {"<extra_id_i>": text}, "filled": prompt with its sentinels replaced, "target"}.
    For ``variant=infill`` models, "filled" is the decoder's text and "spans" is empty."""
    specials = lm.special_tokens
    ids = encode(lm, prompt) + [specials["eos"]]
    start = specials[lm.hparams.get("decoder_start_token", "bos")]
    target = decode_ids(
        lm.model,
        ids,
        start_id=start,
        eos_id=specials["eos"],
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
        vocab_limit=lm.vocab_limit,
    )
    tok = _tokenizer(lm)
    if lm.hparams.get("variant", "span") == "infill":
        return {"prompt": prompt, "spans": {}, "filled": decode(lm, target), "target": tok.decode(target)}
    sentinels = []
    while f"sentinel_{len(sentinels)}" in specials:
        sentinels.append(specials[f"sentinel_{len(sentinels)}"])
    spans = split_spans(target, sentinels, specials["eos"])
    filled: list[int] = []
    for i in ids[:-1]:
        filled.extend(spans.get(sentinels.index(i), []) if i in sentinels else [i])
    return {
        "prompt": prompt,
        "spans": {f"<extra_id_{k}>": tok.decode(v) for k, v in sorted(spans.items())},
        "filled": decode(lm, filled),
        "target": tok.decode(target, skip_special_tokens=False),
    }
