"""Packing into windows, the global-cursor sampler (resume, world-size changes), and clm_collate."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from llmforge.data.dataset import PAD_VALUE, GlobalCursorSampler, PackedWindows
from llmforge.data.shards import ShardSet, SplitWriter, write_manifest

EOS = 3
# 10 documents, 111 tokens + 10 EOS = 121 stream tokens, so 120 (input, target) pairs
DOC_LENGTHS = [5, 17, 0, 9, 30, 3, 12, 20, 1, 14]
STREAM_LEN = sum(DOC_LENGTHS) + len(DOC_LENGTHS)


def write_shards(directory: Path, docs: list, vocab: int = 70000, shard_tokens: int = 25) -> ShardSet:
    writer = SplitWriter(directory, "train", vocab, EOS, shard_tokens)
    writer.add_many(docs)
    write_manifest(
        directory,
        vocab_size=vocab,
        special_tokens={"eos": EOS},
        tokenizer_sha256="",
        splits={"train": writer.summary()},
    )
    return ShardSet.open(directory)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> ShardSet:
    # token values are unique stream positions + 10 (so a misplaced token cannot go unnoticed)
    docs, pos = [], 0
    for n in DOC_LENGTHS:
        docs.append(list(range(pos + 10, pos + 10 + n)))
        pos += n + 1
    shard_set = write_shards(tmp_path_factory.mktemp("packed"), docs)
    assert len(shard_set.arrays) >= 4  # several shard files
    assert shard_set.num_tokens == STREAM_LEN
    return shard_set


def stream_of(shards: ShardSet) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.int64) for a in shards.arrays])


@pytest.mark.parametrize("seq_len", [1, 3, 7, 8, 16, 119, 120, 121, 500])
def test_packed_windows_cover_every_token_once(shards, seq_len):
    stream = stream_of(shards)
    n = stream.size
    ds = PackedWindows(shards, seq_len)
    assert len(ds) == -(-(n - 1) // seq_len)

    inputs, targets, padded = [], [], 0
    for i in range(len(ds)):
        item = ds[i]
        window = item["tokens"]
        assert item["index"] == i
        assert window.shape == (seq_len + 1,) and window.dtype == np.int64
        real = stream[i * seq_len : i * seq_len + seq_len + 1]
        assert window[: real.size].tolist() == real.tolist()
        assert (window[real.size :] == PAD_VALUE).all()
        padded += real.size < seq_len + 1
        # the (input, target) pairs this window scores
        for j in range(seq_len):
            if window[j + 1] != PAD_VALUE:
                inputs.append(int(window[j]))
                targets.append(int(window[j + 1]))
    # every token is an input exactly once (except the last) and a target exactly once (except the first)
    assert inputs == stream[:-1].tolist()
    assert targets == stream[1:].tolist()
    assert padded == (0 if (n - 1) % seq_len == 0 else 1)
    if padded:
        assert (ds[len(ds) - 1]["tokens"] == PAD_VALUE).any()


def test_windows_cross_shard_boundaries(shards):
    boundaries = np.cumsum([a.size for a in shards.arrays])[:-1]
    ds = PackedWindows(shards, 16)
    crossing = [i for i in range(len(ds)) if any(i * 16 < b < i * 16 + 17 for b in boundaries)]
    assert crossing, "fixture should give windows that span shards"
    stream = stream_of(shards)
    for i in crossing:
        start, end = ds.span(i)
        assert ds[i]["tokens"][: end - start].tolist() == stream[start:end].tolist()


def test_packed_windows_random_documents_many_shards(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(5, 300, size=int(rng.integers(0, 50))).tolist() for _ in range(80)]
    shards = write_shards(tmp_path, docs, vocab=300, shard_tokens=37)
    stream = stream_of(shards)
    assert stream.tolist() == [t for d in docs for t in [*d, EOS]]
    for seq_len in (5, 64):
        ds = PackedWindows(shards, seq_len)
        got = np.concatenate([ds[i]["tokens"][:-1] for i in range(len(ds))])
        assert got[: stream.size].tolist() == stream.tolist()
        assert (got[stream.size :] == PAD_VALUE).all()


def test_packed_windows_errors(shards):
    with pytest.raises(ValueError, match="seq_len"):
        PackedWindows(shards, 0)
    ds = PackedWindows(shards, 16)
    for bad in (-1, len(ds)):
        with pytest.raises(IndexError):
            ds[bad]


def test_packed_windows_single_token_has_no_window(tmp_path):
    shards = write_shards(tmp_path, [[]])  # one document: just EOS
    assert len(PackedWindows(shards, 4)) == 0


# -- sampler ---------------------------------------------------------------------------------------
def take(sampler: GlobalCursorSampler, k: int) -> list[int]:
    return list(islice(iter(sampler), k))


def global_order(n: int, batch: int, world: int, batches: int, start: int = 0, seed: int = 0) -> list[int]:
    """What a world of `world` ranks consumes in `batches` global batches, in global order."""
    per_rank = [
        take(GlobalCursorSampler(n, batch, r, world, seed=seed, start=start), batches * batch)
        for r in range(world)
    ]
    out = []
    for g in range(batches):
        for r in range(world):
            out += per_rank[r][g * batch : (g + 1) * batch]
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_draw_disjoint_slices_that_cover_the_permutation(world):
    n, batch = 48, 4
    batches = n // (batch * world)  # exactly one epoch
    per_rank = [take(GlobalCursorSampler(n, batch, r, world, seed=7), batches * batch) for r in range(world)]
    for g in range(batches):
        slices = [set(per_rank[r][g * batch : (g + 1) * batch]) for r in range(world)]
        assert sum(len(s) for s in slices) == len(set().union(*slices)) == batch * world
    assert sorted(i for rank in per_rank for i in rank) == list(range(n))
    # and the global order is the world=1 order
    assert global_order(n, batch, world, batches, seed=7) == take(GlobalCursorSampler(n, 1, seed=7), n)


def test_one_epoch_visits_every_index_once():
    n = 37
    order = take(GlobalCursorSampler(n, 5, seed=1), 3 * n)
    epochs = [order[k * n : (k + 1) * n] for k in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    assert epochs[0] != list(range(n))


def test_seeds():
    n = 50
    a = take(GlobalCursorSampler(n, 4, seed=3), 2 * n)
    assert a == take(GlobalCursorSampler(n, 4, seed=3), 2 * n)
    assert a != take(GlobalCursorSampler(n, 4, seed=4), 2 * n)


def test_no_shuffle_is_sequential():
    assert take(GlobalCursorSampler(5, 2, shuffle=False), 12) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert take(GlobalCursorSampler(5, 2, rank=1, world_size=2, shuffle=False), 4) == [2, 3, 1, 2]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("cursor_batches", [1, 5, 13])  # 13 * 4 * world > n: resumes in a later epoch
def test_resume_same_world(world, cursor_batches):
    n, batch, total = 30, 4, 20
    full = global_order(n, batch, world, total, seed=11)
    cursor = cursor_batches * batch * world
    resumed = global_order(n, batch, world, total - cursor_batches, start=cursor, seed=11)
    assert full[:cursor] + resumed == full


@pytest.mark.parametrize(
    "before, after",  # (world_size, per-rank batch)
    [((2, 4), (1, 4)), ((1, 4), (3, 4)), ((3, 2), (2, 3)), ((2, 4), (4, 1)), ((4, 3), (1, 5))],
)
def test_resume_after_world_size_change(before, after):
    """Run k global batches with one world, resume at the cursor with another: no repeat, no skip."""
    n, k = 41, 7
    (world_a, batch_a), (world_b, batch_b) = before, after
    first = global_order(n, batch_a, world_a, k, seed=5)
    cursor = k * batch_a * world_a
    assert len(first) == cursor
    later_batches = 9
    second = global_order(n, batch_b, world_b, later_batches, start=cursor, seed=5)
    reference = take(GlobalCursorSampler(n, 1, seed=5), cursor + later_batches * batch_b * world_b)
    assert first + second == reference
    # every index of an epoch seen exactly once across the restart
    assert sorted(reference[:n]) == list(range(n))


def test_sampler_errors():
    with pytest.raises(ValueError, match="no samples"):
        GlobalCursorSampler(0, 4)
    with pytest.raises(ValueError, match="rank"):
        GlobalCursorSampler(10, 4, rank=2, world_size=2)


def test_sampler_with_dataloader(shards):
    ds = PackedWindows(shards, 8)
    sampler = GlobalCursorSampler(len(ds), 3, seed=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=lambda s: s)
    batch = next(iter(loader))
    assert [s["index"] for s in batch] == take(GlobalCursorSampler(len(ds), 3, seed=2), 3)


# -- clm_collate -----------------------------------------------------------------------------------
def test_clm_collate_shift_and_padding():
    from llmforge.objectives.clm import IGNORE_INDEX, clm_collate

    windows = [np.array([5, 6, 7, 8, 9]), np.array([10, 11, 12, -1, -1]), np.array([13, -1, -1, -1, -1])]
    samples = [{"index": i * 2, "tokens": w.copy()} for i, w in enumerate(windows)]
    out = clm_collate(samples, pad_id=0)
    assert IGNORE_INDEX == -100
    assert out["input_ids"].tolist() == [[5, 6, 7, 8], [10, 11, 12, 0], [13, 0, 0, 0]]
    assert out["labels"].tolist() == [[6, 7, 8, 9], [11, 12, -100, -100], [-100, -100, -100, -100]]
    assert out["index"].tolist() == [0, 2, 4]
    assert out["input_ids"].dtype == out["labels"].dtype == out["index"].dtype == torch.long
    for s, w in zip(samples, windows, strict=True):  # the samples are left untouched
        assert s["tokens"].tolist() == w.tolist()


def test_clm_collate_on_packed_windows(shards):
    from llmforge.objectives.clm import IGNORE_INDEX, clm_collate

    seq_len = 7
    ds = PackedWindows(shards, seq_len)
    batch = clm_collate([ds[i] for i in range(len(ds))], pad_id=1)
    stream = stream_of(shards)
    assert batch["input_ids"].shape == batch["labels"].shape == (len(ds), seq_len)
    scored = batch["labels"] != IGNORE_INDEX
    assert batch["labels"][scored].tolist() == stream[1:].tolist()
    assert batch["input_ids"][scored].tolist() == stream[:-1].tolist()
    assert (batch["input_ids"] >= 0).all()
