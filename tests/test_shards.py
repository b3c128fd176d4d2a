"""The on-disk token format: writer, manifest, reader, dtype choice, checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from llmforge.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    ShardSet,
    SplitWriter,
    dtype_for_vocab,
    manifest_sha256,
    read_manifest,
    sha256_file,
    write_manifest,
)

EOS = 3
SPECIALS = {"pad": 0, "unk": 1, "bos": 2, "eos": EOS, "mask": 4}


def random_docs(n: int, vocab: int, seed: int = 0, max_len: int = 40, low: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(low, vocab, size=int(rng.integers(0, max_len))) for _ in range(n)]


def write_dataset(
    directory: Path, splits: dict[str, list], vocab: int = 1000, shard_tokens: int = 1 << 20
) -> dict:
    summaries = {}
    for split, docs in splits.items():
        writer = SplitWriter(directory, split, vocab, EOS, shard_tokens)
        writer.add_many(docs)
        summaries[split] = writer.summary()
    return write_manifest(
        directory, vocab_size=vocab, special_tokens=SPECIALS, tokenizer_sha256="0" * 64, splits=summaries
    )


def test_round_trip(tmp_path):
    docs = random_docs(25, 1000) + [np.array([], dtype=np.int64), [7, 8, 9]]
    val = random_docs(5, 1000, seed=1)
    manifest = write_dataset(tmp_path, {"train": docs, "val": val})
    assert manifest["dtype"] == "uint16"
    assert json.loads((tmp_path / MANIFEST).read_text()) == manifest

    for split, expected in (("train", docs), ("val", val)):
        shards = ShardSet.open(tmp_path, split)
        got = list(shards.documents())
        assert len(got) == len(expected) == shards.num_documents
        for doc, back in zip(expected, got, strict=True):
            assert back.tolist() == [*list(doc), EOS]
        assert shards.num_tokens == sum(len(d) + 1 for d in expected)
        assert manifest["splits"][split]["tokens"] == shards.num_tokens
        assert manifest["splits"][split]["documents"] == len(expected)
        assert all(a.dtype == np.uint16 for a in shards.arrays)


@pytest.mark.parametrize(
    "vocab, dtype",
    [
        (1, "uint16"),
        (32000, "uint16"),
        (65535, "uint16"),
        (65536, "uint16"),
        (65537, "uint32"),
        (70000, "uint32"),
        (2**32, "uint32"),
    ],
)
def test_dtype_for_vocab(vocab, dtype):
    assert dtype_for_vocab(vocab) == np.dtype(dtype)
    assert dtype_for_vocab(vocab).byteorder in ("<", "=", "|")  # little-endian on disk


@pytest.mark.parametrize("vocab", [0, -5, 2**32 + 1])
def test_dtype_for_vocab_rejects(vocab):
    with pytest.raises(ValueError):
        dtype_for_vocab(vocab)


def test_round_trip_large_vocab(tmp_path):
    vocab = 70000
    docs = [[65535, 65536, 69999, 0, 1], [70000 - 1] * 3, list(range(65530, 65545))]
    manifest = write_dataset(tmp_path, {"train": docs}, vocab=vocab)
    assert manifest["dtype"] == "uint32"
    bin_file = tmp_path / manifest["splits"]["train"]["shards"][0]["file"]
    assert bin_file.stat().st_size == 4 * manifest["splits"]["train"]["tokens"]
    shards = ShardSet.open(tmp_path)
    assert [d.tolist() for d in shards.documents()] == [[*d, EOS] for d in docs]


@pytest.mark.parametrize("vocab, bad", [(1000, 1000), (1000, 5000), (65536, 65536), (70000, -1), (1000, -3)])
def test_writer_refuses_ids_outside_vocab(tmp_path, vocab, bad):
    writer = SplitWriter(tmp_path, "train", vocab, EOS)
    writer.add([5, 6])
    with pytest.raises(ValueError, match=str(bad)):
        writer.add([7, bad, 8])
    # the refused document left nothing behind
    assert writer.summary()["documents"] == 1
    assert writer.summary()["tokens"] == 3


def test_shard_rollover(tmp_path):
    docs = random_docs(60, 1000, seed=2, max_len=30)
    shard_tokens = 64
    manifest = write_dataset(tmp_path, {"train": docs}, shard_tokens=shard_tokens)
    shard_list = manifest["splits"]["train"]["shards"]
    assert len(shard_list) >= 5
    assert [s["file"] for s in shard_list] == [f"train-{k:05d}.bin" for k in range(len(shard_list))]
    for k, shard in enumerate(shard_list):
        path = tmp_path / shard["file"]
        data = np.fromfile(path, dtype="<u2")
        ends = np.fromfile(path.with_suffix(".idx"), dtype="<i8")
        assert data.size == shard["tokens"]
        assert ends.size == shard["documents"]
        assert ends[-1] == data.size  # shards hold whole documents
        assert data[ends - 1].tolist() == [EOS] * ends.size
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
        if k < len(shard_list) - 1:
            assert shard["tokens"] >= shard_tokens  # a shard closes once it reaches the cap
        if ends.size > 1:
            assert ends[-2] < shard_tokens  # ... and not before
    assert sum(s["tokens"] for s in shard_list) == manifest["splits"]["train"]["tokens"]
    assert sum(s["documents"] for s in shard_list) == manifest["splits"]["train"]["documents"] == len(docs)
    assert not list(tmp_path.glob("*.tmp"))
    assert [d.tolist() for d in ShardSet.open(tmp_path, verify=True).documents()] == [
        [*d.tolist(), EOS] for d in docs
    ]


def test_open_without_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json.*llmforge\.prepare"):
        ShardSet.open(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        read_manifest(tmp_path / "nope")


def test_open_unknown_split(tmp_path):
    write_dataset(tmp_path, {"train": [[5, 6]]})
    with pytest.raises(KeyError, match="val"):
        ShardSet.open(tmp_path, "val")


def test_format_version_checked(tmp_path):
    write_dataset(tmp_path, {"train": [[5, 6]]})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format"):
        ShardSet.open(tmp_path)


def test_verify_detects_corruption(tmp_path):
    manifest = write_dataset(tmp_path, {"train": random_docs(40, 1000)}, shard_tokens=100)
    victim = tmp_path / manifest["splits"]["train"]["shards"][1]["file"]
    ShardSet.open(tmp_path, verify=True)  # intact: fine
    raw = bytearray(victim.read_bytes())
    raw[10] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        ShardSet.open(tmp_path, verify=True)
    ShardSet.open(tmp_path, verify=False)  # same size: only the checksum can tell


def test_truncated_shard_detected_without_verify(tmp_path):
    manifest = write_dataset(tmp_path, {"train": random_docs(40, 1000)}, shard_tokens=100)
    victim = tmp_path / manifest["splits"]["train"]["shards"][0]["file"]
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(ValueError, match="tokens"):
        ShardSet.open(tmp_path, verify=False)


def test_manifest_contents_and_hash(tmp_path):
    manifest = write_dataset(tmp_path, {"train": [[5]], "val": [[6, 7]]})
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["vocab_size"] == 1000
    assert manifest["special_tokens"] == SPECIALS
    assert manifest["eos_appended"] is True
    assert set(manifest["splits"]) == {"train", "val"}
    assert manifest_sha256(tmp_path) == hashlib.sha256((tmp_path / MANIFEST).read_bytes()).hexdigest()
    assert not (tmp_path / (MANIFEST + ".tmp")).exists()


def test_writer_output_is_deterministic(tmp_path):
    docs = random_docs(30, 1000, seed=5)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_dataset(tmp_path / "a", {"train": docs}, shard_tokens=80)
    b = write_dataset(tmp_path / "b", {"train": docs}, shard_tokens=80)
    assert a == b
    assert len(a["splits"]["train"]["shards"]) > 1


# -- issue 12, item 8: damaged shards must not train -------------------------------------------------------
def test_scrambled_shard_is_refused_by_default_naming_the_file(tmp_path):
    manifest = write_dataset(tmp_path, {"train": random_docs(40, 1000)}, shard_tokens=100)
    victim = tmp_path / manifest["splits"]["train"]["shards"][2]["file"]
    raw = bytearray(victim.read_bytes())
    raw[4], raw[5] = raw[5], raw[4] ^ 0x01  # same size, different bytes
    victim.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"^{victim}: damaged \(sha256 checksum"):
        ShardSet.open(tmp_path)


def test_verification_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    import os

    from llmforge.data import shards

    manifest = write_dataset(tmp_path, {"train": random_docs(40, 1000)}, shard_tokens=100)
    ShardSet.open(tmp_path)
    cached = json.loads((tmp_path / shards.VERIFIED).read_text())
    assert sorted(cached) == sorted(s["file"] for s in manifest["splits"]["train"]["shards"])
    scanned = []
    real_scan = shards.scan_shard
    monkeypatch.setattr(
        shards, "scan_shard", lambda path, dtype: scanned.append(path.name) or real_scan(path, dtype)
    )
    ShardSet.open(tmp_path)
    assert scanned == []  # later opens read no shard
    victim = tmp_path / manifest["splits"]["train"]["shards"][1]["file"]
    raw = bytearray(victim.read_bytes())
    raw[0] ^= 0x01
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 1_000_000))
    with pytest.raises(ValueError, match="damaged"):
        ShardSet.open(tmp_path)
    assert scanned == [victim.name]  # only the changed shard was read again


def test_token_id_beyond_declared_vocab_names_the_file(tmp_path):
    manifest = write_dataset(tmp_path, {"train": [[5, 6, 700], [8, 9]]})
    manifest["vocab_size"] = 512  # the ids were written for a larger vocabulary
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    shard = tmp_path / manifest["splits"]["train"]["shards"][0]["file"]
    with pytest.raises(ValueError, match=rf"^{shard}: token id 700 is outside .*vocab_size=512"):
        ShardSet.open(tmp_path)


def test_read_only_dataset_caches_its_verification_in_the_cache_dir(tmp_path, monkeypatch):
    from llmforge.data import shards

    data = tmp_path / "data"
    data.mkdir()
    write_dataset(data, {"train": random_docs(40, 1000)}, shard_tokens=100)
    monkeypatch.setenv("LLMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    real_write = shards.write_json_atomic

    def read_only(path, obj):  # what a shared dataset this user cannot write gives (root ignores chmod)
        if path.parent == data:
            raise PermissionError(13, "Permission denied", str(path))
        real_write(path, obj)

    monkeypatch.setattr(shards, "write_json_atomic", read_only)
    ShardSet.open(data)
    assert not (data / shards.VERIFIED).exists()
    assert len(list((tmp_path / "cache" / "verified").glob("*.json"))) == 1
    scanned = []
    monkeypatch.setattr(shards, "scan_shard", lambda path, dtype: scanned.append(path.name))
    ShardSet.open(data)
    assert scanned == []  # later opens of the read-only dataset read no shard either
