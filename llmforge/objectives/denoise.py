"""Denoising with an encoder-decoder: T5 span corruption, or BART text infilling.

Both collate functions are pure functions of the samples and a seed; a batch's random generator is
``numpy.random.default_rng([seed, *sample indices])`` (independent of DataLoader workers, reproduced on
resume). Each window contributes its first ``seq_len`` tokens, the source (the last token of a window is
the next window's first: each token of the stream is a source token once per epoch); window padding (-1,
the last window of a split) is left out of the noise and padded back at the end.

**Span corruption** (``variant=span``, T5's ``random_spans_noise_mask``): of n source tokens,
``num_noise = round(n * noise_density)`` (between 1 and n - 1) form ``num_spans = round(num_noise /
mean_span_length)`` (at least 1) noise spans; noise and non-noise tokens are each cut into num_spans
non-empty runs at uniformly random places and interleaved, non-noise first. The input keeps the non-noise
tokens and replaces noise span i by sentinel i (``<extra_id_i>``), then EOS; the target is sentinel i
followed by span i, for every span in order, then EOS::

    source   The  cat  sat  on   the  mat  .
    input    The  <extra_id_0>  on  the  <extra_id_1>  <eos>
    target   <extra_id_0>  cat  sat  <extra_id_1>  mat  .  <eos>

Lengths depend on n only, so a full window always gives the same ``(inputs, targets)`` lengths
(`span_lengths`): e.g. seq_len 256 -> 232 input and 52 target tokens (38 noise tokens in 13 spans); a
shorter window gives shorter ones, padded. No span is ever cut. The sentinels needed are num_spans at
``data.seq_len``: the module checks the tokenizer has them before training starts.

**Text infilling** (``variant=infill``, BART): ``round(n * noise_density)`` noise tokens in spans whose
lengths are drawn from Poisson(``mean_span_length``) (a zero-length span is an insertion), placed at random
with at least one kept token between spans; each span becomes one ``<mask>`` in the input; the target is
the whole source. Inputs and targets are both n tokens long at most (no EOS is appended: the window is a
piece of a packed stream that holds EOS at its document ends).

The decoder reads the target shifted right behind a start token (``decoder_start_token``, BOS by default:
T5 uses PAD; BOS is otherwise unused in the shards, so it means only "start decoding"). Loss and accuracy
are over the target tokens; padding is -100. ``tokens_in_batch`` counts source tokens (``seq_len`` per
sample, as for the other objectives), and ``flops_per_token`` is per source token too.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from llmforge.config import DENOISE_VARIANTS
from llmforge.data.documents import document_batch, document_ids
from llmforge.models.transformer import EncoderDecoder, flops_per_token
from llmforge.objectives.base import PretrainModule, require_special_tokens

IGNORE_INDEX = -100
DOCUMENT_KEYS = ("position_ids", "doc_ids", "decoder_position_ids", "decoder_doc_ids")


# -- span corruption ----------------------------------------------------------------------------------
def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of `length` tokens (T5's rounding and clamping)."""
    length = max(length, 2)
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    return num_noise, num_spans


def span_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(input length, target length) of span corruption on `length` source tokens: the non-noise tokens,
    one sentinel per span and EOS; the noise tokens, one sentinel per span and EOS. Both grow with length,
    so the lengths of a full window bound every window's."""
    num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
    if length < 2:
        return length + 1, 1  # the token and EOS; EOS
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of `num_segments` non-empty runs that partition `num_items` items, cut uniformly at random."""
    cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """Boolean noise mask of `length` tokens: T5's alternation of non-noise and noise runs."""
    full = max(length, 2)
    num_noise, num_spans = span_counts(full, noise_density, mean_span_length)
    noise = random_segmentation(num_noise, num_spans, rng)
    keep = random_segmentation(full - num_noise, num_spans, rng)
    runs = np.stack([keep, noise], axis=1).ravel()  # keep_0, noise_0, keep_1, noise_1, ...
    return np.repeat(np.tile([False, True], num_spans), runs)[:length]


def corrupt_spans(tokens: np.ndarray, noise: np.ndarray, sentinels: np.ndarray, eos_id: int):
    """(inputs, targets) of one sequence for a given noise mask."""
    starts = noise & ~np.concatenate([[False], noise[:-1]])
    span = np.cumsum(starts) - 1
    inputs = np.where(starts, sentinels[np.maximum(span, 0)], tokens)[~noise | starts]
    noise_tokens = tokens[noise]
    first_in_noise = np.flatnonzero(starts[noise])  # where each span begins among the noise tokens
    targets = np.insert(noise_tokens, first_in_noise, sentinels[: len(first_in_noise)])
    return np.append(inputs, eos_id), np.append(targets, eos_id)


def span_corruption_collate(
    samples: list[dict],
    *,
    seed: int,
    sentinel_ids: np.ndarray,
    eos_id: int,
    pad_id: int,
    start_id: int,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    document_eos_id: int | None = None,
    reset_positions: bool = False,
) -> dict[str, torch.Tensor]:
    """Windows {"index", "tokens" (seq_len + 1, -1 padded)} -> a span-corrupted batch.

    Returns ``input_ids`` (batch, S), ``decoder_input_ids`` and ``labels`` (batch, T), ``index``, and
    ``attention_mask`` (1 at real input tokens) only when some input is shorter than S; (S, T) =
    `span_lengths` (seq_len, ...). With ``document_eos_id``: the document entries of `packed_documents`.
    """
    index = np.array([s["index"] for s in samples], dtype=np.int64)
    windows = np.stack([s["tokens"] for s in samples])[:, :-1]
    seq_len = windows.shape[1]
    in_len, tgt_len = span_lengths(seq_len, noise_density, mean_span_length)
    needed = span_counts(seq_len, noise_density, mean_span_length)[1]
    if needed > len(sentinel_ids):
        raise ValueError(f"{seq_len} tokens need {needed} sentinels, got {len(sentinel_ids)}")
    rng = np.random.default_rng([seed, *index.tolist()])
    b = len(samples)
    inputs = np.full((b, in_len), pad_id, dtype=np.int64)
    labels = np.full((b, tgt_len), IGNORE_INDEX, dtype=np.int64)
    lengths = np.zeros(b, dtype=np.int64)
    docs = None if document_eos_id is None else (np.full_like(inputs, -1), np.full_like(labels, -1))
    for r, window in enumerate(windows):
        n = int((window >= 0).sum())  # padding only ever ends a window
        noise = random_spans_noise_mask(n, noise_density, mean_span_length, rng)
        x, y = corrupt_spans(window[:n], noise, sentinel_ids, eos_id)
        inputs[r, : len(x)], labels[r, : len(y)] = x, y
        lengths[r] = len(x)
        if docs is not None:
            x_doc, y_doc = span_documents(document_ids(window[None, :n], document_eos_id)[0], noise)
            docs[0][r, : len(x)], docs[1][r, : len(y)] = x_doc, y_doc
    return _encdec_batch(inputs, labels, lengths, index, pad_id, start_id, docs, reset_positions)


def span_documents(doc: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Documents of the (inputs, targets) `corrupt_spans` makes of source tokens in documents ``doc``.

    A noise span belongs to the document it starts in, whole (its sentinel in the input, its sentinel and
    tokens in the target), even where it runs on into the next document; other tokens keep their own. So
    every document of the target has input tokens of its own to attend to: at least its spans' sentinels.
    The final EOS of both belongs to the last source token's document.
    """
    eff = effective_documents(doc, noise)
    starts = noise & ~np.concatenate([[False], noise[:-1]])
    x_doc = eff[~noise | starts]
    y_doc = np.insert(eff[noise], np.flatnonzero(starts[noise]), eff[starts])
    return np.append(x_doc, eff[-1]), np.append(y_doc, eff[-1])


def effective_documents(doc: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``doc``, with every noise token given the document of its span's first token."""
    idx = np.arange(len(doc))
    starts = noise & ~np.concatenate([[False], noise[:-1]])
    first = np.maximum.accumulate(np.where(starts, idx, 0))
    return np.where(noise, doc[first], doc)


# -- text infilling -------------------------------------------------------------------------------------
def infill_spans(
    length: int, noise_density: float, poisson_lambda: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of BART's infilling spans over `length` tokens, in order and non-adjacent.

    ``round(length * noise_density)`` noise tokens; span lengths ~ Poisson(lambda) until they cover them
    (the last one cut to fit); zero-length spans are insertions, kept only as long as there are no more
    spans than noise tokens (so the input never grows); at least one kept token between two spans.
    """
    num_noise = min(round(length * noise_density), max(length - 1, 0))
    if num_noise == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    draws = rng.poisson(poisson_lambda, size=2 * num_noise + 16)  # more than enough: their mean is lambda
    while draws.sum() < num_noise:
        draws = np.concatenate([draws, rng.poisson(poisson_lambda, size=num_noise + 16)])
    cum = np.cumsum(draws)
    k = int(np.searchsorted(cum, num_noise)) + 1
    lengths = draws[:k].copy()
    lengths[-1] -= cum[k - 1] - num_noise
    zero = np.flatnonzero(lengths == 0)
    excess = len(lengths) - num_noise
    if excess > 0:
        lengths = np.delete(lengths, rng.choice(zero, excess, replace=False))
    lengths = rng.permutation(lengths)
    k = len(lengths)
    kept = length - num_noise
    spare = kept - (k - 1)  # gaps between spans need one kept token each; the rest is spread at random
    if spare < 0:
        raise ValueError(f"noise_density={noise_density} leaves too few kept tokens to separate the spans")
    picks = np.sort(rng.choice(spare + k, k, replace=False))
    gaps = np.diff(np.concatenate([[-1], picks])) - 1  # gaps before each span, from stars and bars
    gaps[1:] += 1
    starts = np.cumsum(gaps) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return starts.astype(np.int64), lengths.astype(np.int64)


def infill_collate(
    samples: list[dict],
    *,
    seed: int,
    mask_id: int,
    pad_id: int,
    start_id: int,
    noise_density: float = 0.3,
    mean_span_length: float = 3.0,
    document_eos_id: int | None = None,
    reset_positions: bool = False,
) -> dict[str, torch.Tensor]:
    """Windows -> a BART text-infilling batch: ``input_ids`` (batch, seq_len), ``decoder_input_ids`` and
    ``labels`` (batch, seq_len), ``index``, and ``attention_mask`` when an input is shorter. With
    ``document_eos_id``: document entries as `span_corruption_collate`'s (a span, and its ``<mask>``,
    belong to the document it starts in)."""
    index = np.array([s["index"] for s in samples], dtype=np.int64)
    windows = np.stack([s["tokens"] for s in samples])[:, :-1]
    b, seq_len = windows.shape
    rng = np.random.default_rng([seed, *index.tolist()])
    inputs = np.full((b, seq_len), pad_id, dtype=np.int64)
    labels = np.where(windows >= 0, windows, IGNORE_INDEX)
    lengths = np.zeros(b, dtype=np.int64)
    docs = None if document_eos_id is None else (np.full_like(inputs, -1), np.full_like(labels, -1))
    for r, window in enumerate(windows):
        n = int((window >= 0).sum())
        starts, span_len = infill_spans(n, noise_density, mean_span_length, rng)
        noise = np.zeros(n, dtype=bool)
        noise[np.repeat(starts, span_len) + _within(span_len)] = True
        kept_before = starts - np.concatenate([[0], np.cumsum(span_len)[:-1]])  # kept tokens before span
        x = np.insert(window[:n][~noise], kept_before, mask_id)
        inputs[r, : len(x)] = x
        lengths[r] = len(x)
        if docs is not None:
            doc = document_ids(window[None, :n], document_eos_id)[0]
            eff = effective_documents(doc, noise)
            span_doc = doc[np.minimum(starts, n - 1)]  # an insertion: the document of the token it precedes
            docs[0][r, : len(x)] = np.insert(eff[~noise], kept_before, span_doc)
            docs[1][r, :n] = eff
    return _encdec_batch(inputs, labels, lengths, index, pad_id, start_id, docs, reset_positions)


def _within(lengths: np.ndarray) -> np.ndarray:
    """0, 1, ..., l - 1 for every l of lengths, concatenated."""
    total = int(lengths.sum())
    return np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _encdec_batch(
    inputs, labels, lengths, index, pad_id: int, start_id: int, docs=None, reset_positions: bool = False
) -> dict[str, torch.Tensor]:
    """The batch dict; ``docs``: (input, target) document ids, -1 at padding, or None. With documents, the
    decoder input restarts with the start token at every document's first target token, so each document
    is decoded as if alone."""
    decoder_inputs = np.full_like(labels, pad_id)
    decoder_inputs[:, 0] = start_id
    decoder_inputs[:, 1:] = np.where(labels[:, :-1] >= 0, labels[:, :-1], pad_id)
    if docs is not None:
        y_doc = docs[1]
        decoder_inputs[:, 1:][(y_doc[:, 1:] != y_doc[:, :-1]) & (y_doc[:, 1:] >= 0)] = start_id
    batch = {
        "input_ids": torch.from_numpy(inputs),
        "decoder_input_ids": torch.from_numpy(decoder_inputs),
        "labels": torch.from_numpy(labels),
        "index": torch.from_numpy(index),
    }
    if (lengths < inputs.shape[1]).any():
        batch["attention_mask"] = torch.from_numpy(np.arange(inputs.shape[1]) < lengths[:, None])
    if docs is not None:
        batch.update(document_batch(docs[0], reset_positions))
        batch.update(document_batch(docs[1], reset_positions, prefix="decoder_"))
    return batch


# -- the module -------------------------------------------------------------------------------------------
class Denoise(PretrainModule):
    """T5-style encoder-decoder trained by span corruption (or BART-style text infilling)."""

    metric_names = ("acc",)

    def __init__(
        self,
        model: dict,
        optim: dict,
        special_tokens: dict[str, int],
        name: str = "denoise",
        data: dict | None = None,
        variant: str = "span",
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        decoder_start_token: str = "bos",
        fused_ce: bool = True,
        z_loss: float = 0.0,
    ) -> None:
        if variant not in DENOISE_VARIANTS:
            raise ValueError(f"objective.variant={variant!r} is not one of {', '.join(DENOISE_VARIANTS)}")
        limit = 0.5 if variant == "infill" else 1.0
        if not 0.0 < noise_density < limit:
            raise ValueError(f"objective.noise_density={noise_density} must be in (0, {limit}) for {variant}")
        if mean_span_length < (1.0 if variant == "span" else 0.0) or mean_span_length == 0:
            raise ValueError(f"objective.mean_span_length={mean_span_length} is too small for {variant}")
        data = dict(data or {})
        seq_len = data.get("seq_len")
        if not seq_len:
            raise ValueError("objective=denoise needs the window length: data={'seq_len': ...}")
        needed = {
            "pad": "padding",
            decoder_start_token: "objective.decoder_start_token",
            "eos": "the end of inputs and targets",
        }
        if variant == "span":
            spans = span_counts(seq_len, noise_density, mean_span_length)[1]
            have = 0
            while f"sentinel_{have}" in special_tokens:
                have += 1
            if have < spans:
                raise ValueError(
                    f"objective=denoise (span corruption) needs {spans} sentinel tokens "
                    f"<extra_id_0..{spans - 1}> for data.seq_len={seq_len} at noise_density={noise_density} "
                    f"and mean_span_length={mean_span_length}, and the data's tokenizer has {have}: rebuild "
                    "the shards with "
                    f"`python -m llmforge.prepare tokenizer.num_sentinels={spans}` (or more), or lower "
                    "data.seq_len, or raise objective.mean_span_length"
                )
        else:
            needed["mask"] = "the infilled spans"
        require_special_tokens(special_tokens, needed, objective=f"denoise variant={variant}")
        super().__init__(model, optim, special_tokens, name, data, fused_ce=fused_ce, z_loss=z_loss)
        self.variant, self.noise_density = variant, noise_density
        self.mean_span_length, self.decoder_start_token = mean_span_length, decoder_start_token
        self.seq_len = int(seq_len)
        self.input_len, self.target_len = self.lengths(self.seq_len)
        longest = max(self.input_len, self.target_len)
        if longest > self.model_cfg.max_seq_len:
            raise ValueError(
                f"objective=denoise makes sequences of {longest} tokens from data.seq_len={seq_len}, "
                f"more than model.max_seq_len={self.model_cfg.max_seq_len}"
            )

    def lengths(self, seq_len: int) -> tuple[int, int]:
        """(encoder input, decoder input) lengths of a full window."""
        if self.variant == "span":
            return span_lengths(seq_len, self.noise_density, self.mean_span_length)
        return seq_len, seq_len

    def build_model(self) -> nn.Module:
        return EncoderDecoder(self.model_cfg)

    def collate_fn(self) -> Callable[[list[dict]], dict]:
        common = dict(
            seed=int(self.data_info.get("seed", 0)),
            pad_id=self.special_tokens["pad"],
            start_id=self.special_tokens[self.decoder_start_token],
            noise_density=self.noise_density,
            mean_span_length=self.mean_span_length,
            **self.document_options(),
        )
        if self.variant == "infill":
            return partial(infill_collate, mask_id=self.special_tokens["mask"], **common)
        spans = span_counts(self.seq_len, self.noise_density, self.mean_span_length)[1]
        sentinels = np.array([self.special_tokens[f"sentinel_{i}"] for i in range(spans)], dtype=np.int64)
        eos = self.special_tokens["eos"]
        return partial(span_corruption_collate, sentinel_ids=sentinels, eos_id=eos, **common)

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, decoder_input_ids, attention_mask)

    def loss(self, batch: dict) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        result = self.model(
            batch["input_ids"],
            batch["decoder_input_ids"],
            batch.get("attention_mask"),
            **{k: batch[k] for k in DOCUMENT_KEYS if k in batch},
            head=self.head_loss(batch["labels"], accuracy=True),
        )
        acc = result.correct / result.count.clamp(min=1)
        return result.loss, int(result.count), {"acc": acc.float(), **self.loss_metrics(result)}

    def tokens_in_batch(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] * self.seq_len

    def flops_per_token(self, batch: dict) -> float:
        s, t = batch["input_ids"].shape[1], batch["decoder_input_ids"].shape[1]
        per_input = flops_per_token(self.model_cfg, s, arch="encdec", target_len=t)
        return per_input * s / self.seq_len
