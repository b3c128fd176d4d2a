"""Masked language modelling (BERT): a bidirectional encoder predicts the selected tokens of its input.

`mlm_collate` is a pure function of the samples and a seed. Per window of ``seq_len`` tokens (the window's
last token is the next window's first: dropping it, every token of the stream is an input once per epoch):

- the maskable tokens are those that are neither special (EOS between packed documents, PAD, ...) nor
  window padding;
- ``round(mask_prob * maskable)`` of them are selected (at least one), uniformly at random, as BERT and
  Megatron-LM do (an exact count per sequence, not one coin per token);
- of the selected tokens, ``mask_token_prob`` become ``<mask>``, ``random_token_prob`` a token drawn
  uniformly from the non-special vocabulary, the rest stay as they are (one draw per token: 80/10/10);
- labels hold the original token at the selected positions, -100 elsewhere.

With ``whole_word_mask``, words are selected instead of tokens (a word starts at a token whose first byte
is whitespace or ASCII punctuation, after a special token, at the window start, or after 8 tokens of one
word); words are taken in random order until the selected tokens reach the count (the word that crosses it
is kept when at least half of it fits, so the realised rate stays unbiased).

The random generator of a batch is ``numpy.random.default_rng([seed, *sample indices])``: a batch is masked
the same way whatever the number of DataLoader workers, and again after a resume; the same window is masked
differently in another epoch, in another batch (dynamic masking, as RoBERTa).

The head runs on the selected positions only (``mlm_positions``, flat indices into the batch): the loss,
the masked-token accuracy and the perplexity are over the masked tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmforge.data.documents import document_batch, document_ids
from llmforge.models.transformer import Encoder, flops_per_token
from llmforge.objectives.base import PretrainModule, require_special_tokens

IGNORE_INDEX = -100
MAX_WORD_TOKENS = 8


def select_tokens(rng: np.random.Generator, eligible: np.ndarray, prob: float) -> np.ndarray:
    """Exactly max(1, round(prob * eligible in the row)) eligible positions per row (none if none)."""
    n = eligible.sum(axis=1)
    k = np.where(n > 0, np.maximum(1, np.rint(n * prob)), 0)
    keys = rng.random(eligible.shape)
    keys[~eligible] = 2.0  # after every eligible position
    rank = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
    return rank < k[:, None]


def select_words(
    rng: np.random.Generator, eligible: np.ndarray, word_start: np.ndarray, prob: float
) -> np.ndarray:
    """Whole words (runs of eligible tokens opened by a word start) until ~prob of the eligible tokens."""
    b, t = eligible.shape
    before = np.zeros_like(eligible)
    before[:, 1:] = eligible[:, :-1]
    starts = word_start | ~eligible | ~before  # non-eligible tokens are words of their own, never chosen
    idx = np.broadcast_to(np.arange(t), (b, t))
    opened = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    starts |= (idx - opened) % MAX_WORD_TOKENS == 0  # split very long runs (text without spaces)
    word = np.cumsum(starts.ravel()) - 1  # word id of every position, across the batch
    n_words = int(word[-1]) + 1
    first = np.flatnonzero(starts.ravel())
    row = first // t
    usable = eligible.ravel()[first]
    length = np.bincount(word, minlength=n_words) * usable  # unusable words weigh nothing
    keys = np.where(usable, rng.random(n_words), 2.0)
    order = np.lexsort((keys, row))  # per row, usable words in random order first
    cum = np.cumsum(length[order])
    row_before = np.concatenate([[0], np.cumsum(np.bincount(row, weights=length, minlength=b))])
    before_word = cum - length[order] - row_before[row[order]]
    n = eligible.sum(axis=1)
    k = np.where(n > 0, np.maximum(1, np.rint(n * prob)), 0)
    take = np.zeros(n_words, dtype=bool)
    take[order] = usable[order] & (before_word + length[order] / 2 <= k[row[order]])
    return take[word].reshape(b, t) & eligible


def mlm_collate(
    samples: list[dict],
    *,
    seed: int,
    mask_id: int,
    pad_id: int,
    special_ids: np.ndarray,
    random_ids: np.ndarray,
    mask_prob: float = 0.15,
    mask_token_prob: float = 0.8,
    random_token_prob: float = 0.1,
    word_start: np.ndarray | None = None,
    document_eos_id: int | None = None,
    reset_positions: bool = False,
) -> dict[str, torch.Tensor]:
    """Windows {"index", "tokens" (seq_len + 1, -1 padded)} -> a masked batch.

    Returns ``input_ids`` (batch, seq_len), ``labels`` (-100 where not selected), ``mlm_positions`` (flat
    indices of the selected tokens), ``index``, and ``attention_mask`` (1 at real tokens) only when the
    batch holds padding. ``random_ids``: the non-special ids replacements are drawn from; ``word_start``:
    per vocabulary id, whether a token opens a word (whole word masking), or None. With ``document_eos_id``
    (``data.document_mask``): ``doc_ids`` (and ``position_ids`` to reset RoPE) from the unmasked tokens.
    """
    index = np.array([s["index"] for s in samples], dtype=np.int64)
    windows = np.stack([s["tokens"] for s in samples])[:, :-1]
    rng = np.random.default_rng([seed, *index.tolist()])
    valid = windows >= 0
    tokens = np.where(valid, windows, pad_id)
    eligible = valid & ~np.isin(tokens, special_ids)
    if word_start is None:
        selected = select_tokens(rng, eligible, mask_prob)
    else:
        selected = select_words(rng, eligible, word_start[tokens], mask_prob)
    draw = rng.random(tokens.shape)
    to_mask = selected & (draw < mask_token_prob)
    to_random = selected & (draw >= mask_token_prob) & (draw < mask_token_prob + random_token_prob)
    inputs = tokens.copy()
    inputs[to_mask] = mask_id
    inputs[to_random] = random_ids[rng.integers(0, len(random_ids), size=int(to_random.sum()))]
    labels = np.where(selected, tokens, IGNORE_INDEX)
    batch = {
        "input_ids": torch.from_numpy(inputs),
        "labels": torch.from_numpy(labels),
        "mlm_positions": torch.from_numpy(np.flatnonzero(selected)),
        "index": torch.from_numpy(index),
    }
    if not valid.all():
        batch["attention_mask"] = torch.from_numpy(valid)
    if document_eos_id is not None:
        batch.update(document_batch(document_ids(tokens, document_eos_id, valid), reset_positions))
    return batch


def byte_level_word_starts(tokenizer_path: str | Path, size: int) -> np.ndarray:
    """Per id of a byte-level BPE vocabulary: does the token open a word? Yes when its first byte is
    whitespace or ASCII punctuation (GPT-2 pre-tokenization puts a word's space in front of it), and for
    special tokens; no for letters, digits and non-ASCII bytes (continuations)."""
    from tokenizers import Tokenizer, pre_tokenizers

    byte_of = {c: _byte_of(c) for c in pre_tokenizers.ByteLevel.alphabet()}  # characters that stand for bytes
    table = np.ones(size, dtype=bool)
    for token, i in Tokenizer.from_file(str(tokenizer_path)).get_vocab(with_added_tokens=True).items():
        if i >= size or not token or token[0] not in byte_of:
            continue
        b = byte_of[token[0]]
        table[i] = b < 128 and not chr(b).isalnum()
    return table


def _byte_of(char: str) -> int:
    """GPT-2's byte -> printable character map, inverted (printable bytes map to themselves)."""
    code = ord(char)
    if ord("!") <= code <= ord("~") or ord("¡") <= code <= ord("¬") or ord("®") <= code <= ord("ÿ"):
        return code
    # the other 68 bytes are mapped, in order, to 256, 257, ...
    others = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
    return others[code - 256]


class MaskedLM(PretrainModule):
    """BERT-style masked LM on an `Encoder` (the decoder's blocks without the causal mask)."""

    metric_names = ("acc",)

    def __init__(
        self,
        model: dict,
        optim: dict,
        special_tokens: dict[str, int],
        name: str = "mlm",
        data: dict | None = None,
        mask_prob: float = 0.15,
        mask_token_prob: float = 0.8,
        random_token_prob: float = 0.1,
        whole_word_mask: bool = False,
        fused_ce: bool = True,
        z_loss: float = 0.0,
    ) -> None:
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"objective.mask_prob={mask_prob} must be in (0, 1)")
        if mask_token_prob < 0 or random_token_prob < 0 or mask_token_prob + random_token_prob > 1:
            raise ValueError(
                f"objective.mask_token_prob={mask_token_prob} and objective.random_token_prob="
                f"{random_token_prob} must be >= 0 and sum to at most 1"
            )
        require_special_tokens(
            special_tokens, {"mask": "the masked inputs", "pad": "window padding"}, objective="mlm"
        )
        data = dict(data or {})
        if whole_word_mask and not data.get("path"):
            raise ValueError("objective.whole_word_mask needs the data's tokenizer (data.path)")
        super().__init__(model, optim, special_tokens, name, data, fused_ce=fused_ce, z_loss=z_loss)
        self.mask_prob, self.mask_token_prob = mask_prob, mask_token_prob
        self.random_token_prob, self.whole_word_mask = random_token_prob, whole_word_mask
        vocab = int(data.get("vocab_size") or self.model_cfg.vocab_size)
        self.special_ids = np.array(sorted(set(special_tokens.values())), dtype=np.int64)
        self.random_ids = np.setdiff1d(np.arange(vocab, dtype=np.int64), self.special_ids)
        if self.random_ids.size == 0:
            raise ValueError("the vocabulary has no non-special token to draw random replacements from")

    def build_model(self) -> nn.Module:
        return Encoder(self.model_cfg)

    def collate_fn(self) -> Callable[[list[dict]], dict]:
        word_start = None
        if self.whole_word_mask:
            from llmforge.data.shards import TOKENIZER_FILE

            size = int(self.data_info.get("vocab_size") or self.model_cfg.vocab_size)
            word_start = byte_level_word_starts(Path(self.data_info["path"]) / TOKENIZER_FILE, size)
        return partial(
            mlm_collate,
            seed=int(self.data_info.get("seed", 0)),
            mask_id=self.special_tokens["mask"],
            pad_id=self.special_tokens["pad"],
            special_ids=self.special_ids,
            random_ids=self.random_ids,
            mask_prob=self.mask_prob,
            mask_token_prob=self.mask_token_prob,
            random_token_prob=self.random_token_prob,
            word_start=word_start,
            **self.document_options(),
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, attention_mask)

    def loss(self, batch: dict) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        positions, mask = batch["mlm_positions"], batch.get("attention_mask")
        documents = {"position_ids": batch.get("position_ids"), "doc_ids": batch.get("doc_ids")}
        targets = batch["labels"].flatten().index_select(0, positions)
        if targets.numel() == 0:  # nothing maskable in the whole batch: a zero loss that keeps the graph
            zero = self.model(batch["input_ids"], mask, positions, **documents).float().sum() * 0.0
            return zero, 0, {"acc": zero.detach(), "z_loss": zero.detach()}
        head = self.head_loss(targets, accuracy=True)
        result = self.model(batch["input_ids"], mask, positions, **documents, head=head)
        acc = result.correct.float() / targets.numel()
        return result.loss, targets.numel(), {"acc": acc, **self.loss_metrics(result)}

    def flops_per_token(self, batch: dict) -> float:
        rows, seq_len = batch["input_ids"].shape
        predicted = batch["mlm_positions"].numel() / rows  # the head runs on the selected positions only
        return flops_per_token(self.model_cfg, seq_len, arch="encoder", predicted=predicted)
