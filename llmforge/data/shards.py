"""THE on-disk token format shared by the data stage and the trainer.

A dataset is one directory::

    manifest.json              format version, dtype, vocab size, special token ids, tokenizer hash,
                               per split: shard files with token/document counts and sha256
    tokenizer.json             the tokenizer that produced the ids (its sha256 is in the manifest)
    {split}-{k:05d}.bin        raw token ids, little-endian uint16 (vocab <= 65536) or uint32
    {split}-{k:05d}.idx        int64 document end offsets within the shard (document i is
                               tokens[idx[i-1]:idx[i]]); every document ends with EOS
    {split}-{k:05d}.docs.jsonl lineage (optional): line i says where document i came from: its id (WARC
                               record id, file path, JSON id) and, when known, url, file and line

Writers finish each shard under a temporary name and rename it, and the manifest is written last, so a
directory with a manifest is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
LINEAGE_SUFFIX = ".docs.jsonl"  # beside {split}-{k:05d}.bin: one JSON object (a document's origin) per line


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of the vocabulary."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return np.dtype("<u2")
    if vocab_size <= 2**32:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass
class ShardInfo:
    file: str
    tokens: int
    documents: int
    sha256: str


@dataclass
class SplitWriter:
    """Appends documents of one split to size-capped shards; each document gets EOS appended."""

    directory: Path
    split: str
    vocab_size: int
    eos_id: int
    shard_tokens: int = 1 << 26
    stem: str | None = None  # file names are f"{stem}-{k:05d}"; default: the split name
    shards: list[ShardInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dtype = dtype_for_vocab(self.vocab_size)
        self._chunks: list[np.ndarray] = []
        self._ends: list[int] = []
        self._origins: list[dict | None] = []
        self._size = 0

    def add(self, ids: Sequence[int] | np.ndarray, origin: dict | None = None) -> None:
        """Append one document; ``origin`` (id, url, file, line) goes to the shard's lineage file."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr.max()) if arr.max() >= self.vocab_size else int(arr.min())
            raise ValueError(
                f"token id {bad} does not fit the vocabulary of {self.vocab_size} ({self.dtype})"
            )
        self._chunks.append(arr.astype(self.dtype))
        self._chunks.append(np.array([self.eos_id], dtype=self.dtype))
        self._size += arr.size + 1
        self._ends.append(self._size)
        self._origins.append(origin)
        if self._size >= self.shard_tokens:
            self.flush()

    def add_many(self, docs: Iterable[Sequence[int]]) -> None:
        for ids in docs:
            self.add(ids)

    def flush(self) -> None:
        if not self._ends:
            return
        name = f"{self.stem or self.split}-{len(self.shards):05d}"
        bin_path = self.directory / f"{name}.bin"
        tmp = bin_path.with_name(bin_path.name + ".tmp")
        np.concatenate(self._chunks).tofile(tmp)
        os.replace(tmp, bin_path)
        idx_tmp = self.directory / f"{name}.idx.tmp"
        np.asarray(self._ends, dtype="<i8").tofile(idx_tmp)
        os.replace(idx_tmp, self.directory / f"{name}.idx")
        if any(o is not None for o in self._origins):
            lines = "".join(
                json.dumps(o or {}, ensure_ascii=False, sort_keys=True) + "\n" for o in self._origins
            )
            docs_tmp = self.directory / f"{name}{LINEAGE_SUFFIX}.tmp"
            docs_tmp.write_text(lines, encoding="utf-8")
            os.replace(docs_tmp, self.directory / f"{name}{LINEAGE_SUFFIX}")
        self.shards.append(ShardInfo(bin_path.name, self._size, len(self._ends), sha256_file(bin_path)))
        self._chunks, self._ends, self._origins, self._size = [], [], [], 0

    def summary(self) -> dict:
        self.flush()
        return {
            "tokens": sum(s.tokens for s in self.shards),
            "documents": sum(s.documents for s in self.shards),
            "shards": [vars(s) for s in self.shards],
        }


def write_manifest(
    directory: Path,
    *,
    vocab_size: int,
    special_tokens: dict[str, int],
    tokenizer_sha256: str,
    splits: dict[str, dict],
    source: dict | None = None,
    config_hash: str | None = None,
) -> dict:
    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype_for_vocab(vocab_size).name,
        "vocab_size": vocab_size,
        "special_tokens": special_tokens,
        "tokenizer_sha256": tokenizer_sha256,
        "eos_appended": True,
        "splits": splits,
        "source": source or {},
        "config_hash": config_hash,
    }
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


@dataclass
class ShardSet:
    """Read side: one split of a dataset directory as memory-mapped arrays."""

    directory: Path
    manifest: dict
    split: str
    arrays: list[np.memmap]
    doc_ends: list[np.ndarray]

    @classmethod
    def open(cls, directory: str | Path, split: str = "train", verify: bool = True) -> ShardSet:
        """Memory-maps one split. With ``verify`` (the default) every shard's sha256 and largest token id
        are checked first (`verify_split`: read once per dataset, then cached next to the manifest)."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        if split not in manifest["splits"]:
            raise KeyError(f"{directory} has no split {split!r}; it has {sorted(manifest['splits'])}")
        if verify:
            verify_split(directory, manifest, split)
        dtype = np.dtype(manifest["dtype"])
        arrays, ends = [], []
        for shard in manifest["splits"][split]["shards"]:
            path = directory / shard["file"]
            arr = np.memmap(path, dtype=dtype, mode="r")
            if arr.size != shard["tokens"]:
                raise ValueError(f"{path}: {arr.size} tokens on disk, manifest says {shard['tokens']}")
            doc_ends = np.fromfile(path.with_suffix(".idx"), dtype="<i8")
            if doc_ends.size != shard["documents"] or (doc_ends.size and doc_ends[-1] != arr.size):
                raise ValueError(f"{path.with_suffix('.idx')}: document index does not match the manifest")
            arrays.append(arr)
            ends.append(doc_ends)
        return cls(directory, manifest, split, arrays, ends)

    @property
    def num_tokens(self) -> int:
        return sum(a.size for a in self.arrays)

    @property
    def num_documents(self) -> int:
        return sum(e.size for e in self.doc_ends)

    def documents(self) -> Iterable[np.ndarray]:
        for arr, ends in zip(self.arrays, self.doc_ends, strict=True):
            start = 0
            for end in ends:
                yield np.asarray(arr[start:end])
                start = int(end)


VERIFIED = (
    ".verified.json"  # next to the manifest: shard -> size, mtime, sha256 and largest id it was checked at
)


def verified_paths(directory: Path) -> list[Path]:
    """Where `verify_split` keeps its results, in order: next to the manifest, else (a dataset this user
    cannot write: a shared read-only copy) under llmforge's cache directory, keyed by the dataset's path."""
    from llmforge.prep.cache import cache_dir

    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    return [directory / VERIFIED, cache_dir() / "verified" / f"{key}.json"]


def scan_shard(path: Path, dtype: np.dtype, chunk: int = 1 << 24) -> tuple[str, int]:
    """One pass over a shard: its sha256 and its largest token id (-1 when empty)."""
    h, top = hashlib.sha256(), -1
    chunk -= chunk % dtype.itemsize
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if len(block) >= dtype.itemsize:
                top = max(
                    top, int(np.frombuffer(block, dtype=dtype, count=len(block) // dtype.itemsize).max())
                )
    return h.hexdigest(), top


def read_verified(path: Path) -> dict[str, dict]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in cache.items() if isinstance(v, dict)} if isinstance(cache, dict) else {}


def verify_split(directory: Path, manifest: dict, split: str) -> None:
    """Every shard of ``split`` matches the manifest's sha256, and holds no token id at or above the
    manifest's ``vocab_size``; else ValueError naming the file. A shard is read once: the result is cached
    (`verified_paths`) keyed by its size and mtime (and the expected sha256), so later opens read nothing."""
    places = verified_paths(directory)
    found = [read_verified(place) for place in places]
    cache = {name: entry for c in reversed(found) for name, entry in c.items()}  # the first place wins
    dtype, vocab, changed = np.dtype(manifest["dtype"]), int(manifest["vocab_size"]), False
    for shard in manifest["splits"][split]["shards"]:
        path = directory / shard["file"]
        st = path.stat()
        key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": shard["sha256"]}
        name = shard["file"]
        entry = next((c[name] for c in found if name in c and key.items() <= c[name].items()), None)
        if entry is None:
            digest, top = scan_shard(path, dtype)
            if digest != shard["sha256"]:
                raise ValueError(
                    f"{path}: damaged (sha256 checksum {digest[:16]}..., the manifest says "
                    f"{shard['sha256'][:16]}...); rebuild the dataset with python -m llmforge.prepare"
                )
            entry = {**key, "max_id": top}
            changed = True
        cache[name] = entry
        if entry["max_id"] >= vocab:
            raise ValueError(
                f"{path}: token id {entry['max_id']} is outside the manifest's vocabulary "
                f"(vocab_size={vocab})"
            )
    if changed:
        for place in places:
            try:
                place.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(place, cache)
                break
            except OSError:  # a read-only dataset: the next place; none writable: verified again next time
                continue


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no token shards at {directory} ({MANIFEST} missing): run `python -m llmforge.prepare` first"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: shard format {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    return manifest


def manifest_sha256(directory: str | Path) -> str:
    return sha256_file(Path(directory) / MANIFEST)
