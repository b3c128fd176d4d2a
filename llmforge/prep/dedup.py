"""Deduplication: exact (hash of normalised text) and near-duplicate (MinHash + LSH), across shards.

Two stages, so that the expensive part runs in parallel and the decision is global:

1. **Per shard** (any number of workers, any order): `save_signatures` normalises each document, takes a
   64-bit exact hash of the normalised text and a MinHash signature of its word n-gram shingles, and writes
   them atomically to one ``.npz`` per shard.
2. **Global** (one process): `load_signatures` concatenates the shards with keys ``shard << 32 | doc``, and
   `find_duplicates` decides what to drop: exact duplicates first (same hash: keep the smallest key), then
   LSH banding over the remaining signatures, candidate pairs verified by the Jaccard similarity estimated
   from the full signatures, connected components (union-find), keep the smallest key of each component.
   All rows are first sorted by key and every later step breaks ties by key, so the answer depends on the
   keys only, never on the worker count or the order of the rows.

Usage (the pipeline's two passes)::

    hasher = MinHasher(num_perm=128, ngram=5, seed=1)
    save_signatures(f"sig/{shard:05d}.npz", range(len(texts)), texts, hasher)   # each shard, any worker
    paths = sorted(glob("sig/*.npz"))
    keys, exact, sigs = load_signatures(paths, shards=[int(Path(p).stem) for p in paths])   # once
    result = find_duplicates(keys, exact, sigs, threshold=0.8)                  # bands, rows: lsh_params
    drop = set(result.for_shard(shard).tolist())                                # each shard, when filtering

Signatures are bit-for-bit those of ``datasketch.MinHash(num_perm, seed, scheme=...)`` updated with the
same shingles (SHA-1 based 32-bit hash of each shingle's UTF-8 bytes, permutations drawn from
``np.random.RandomState(seed)`` as datasketch draws them), computed with numpy over many shingles at once
(12-16x faster than ``MinHash.update`` per shingle, ~2x ``update_batch``: experiments/bench_minhash.py).
datasketch itself is not needed at run time; the tests compare against it. Schemes: ``"affine32"``
(datasketch >= 2.0 default, uint32 values), ``"legacy"`` (datasketch < 2.0: ``(a*h+b) mod (2**61-1)``
truncated to 32 bits, stored as uint64) and ``"affine64"``.

Memory of the global stage: the signature matrix, ``n x num_perm x 4`` bytes for affine32 (512 B a
document at 128 permutations: 1 M documents ~ 0.5 GB; 8 bytes a value for legacy/affine64; loaded once,
never copied whole), plus ~150 bytes a document for keys, exact hashes, orderings and, transiently, one
band's values, hashes and sort order, plus the candidate pairs (~24 bytes each). Beyond RAM, the global
stage would have to work band by band on disk (as datatrove does); that is not implemented here.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import unicodedata
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from llmforge.prep import cache

__all__ = [
    "DedupResult",
    "MinHasher",
    "SignatureFile",
    "exact_hash",
    "find_duplicates",
    "load_signatures",
    "lsh_params",
    "lsh_recall",
    "normalize_for_dedup",
    "pack_keys",
    "save_signatures",
    "shingles",
    "unpack_keys",
    "write_signatures",
]

# ----------------------------------------------------------------------------------------------------------
# Normalisation and exact hashing


@lru_cache(maxsize=1)
def _punctuation() -> tuple[np.ndarray, dict[int, str]]:
    """Every Unicode punctuation code point (categories Pc Pd Ps Pe Pi Pf Po) as a lookup table, and the
    ASCII ones as a `str.translate` table.

    Derived from the interpreter's Unicode database (~0.2 s), and kept in `llmforge.prep.cache` under its
    version so that each worker process does not derive it again. Symbols (S*) and combining marks (M*)
    are kept: marks are part of words in many scripts.
    """
    size = sys.maxunicode + 1
    name = f"punctuation-unicode-{unicodedata.unidata_version}-{size}.u32"
    stored = cache.load(name)
    cps = np.frombuffer(stored, dtype="<u4") if stored else None
    if cps is None or cps.size == 0 or int(cps.max()) >= size:
        every = "".join(map(chr, range(size)))
        categories = np.frombuffer("".join(map(unicodedata.category, every)).encode("ascii"), np.uint8)
        cps = np.flatnonzero(categories[0::2] == ord("P")).astype("<u4")  # two letters per code point
        cache.store(name, cps.tobytes())
    is_punct = np.zeros(size, dtype=bool)
    is_punct[cps] = True
    return is_punct, {cp: " " for cp in np.flatnonzero(is_punct[:128]).tolist()}


def normalize_for_dedup(text: str) -> str:
    """NFKC, lowercase, punctuation replaced by spaces, whitespace collapsed to single spaces, stripped.

    Replacing (rather than deleting) punctuation keeps ``word,word`` two words. The result depends on the
    interpreter's Unicode database version (NFKC and categories), which changes rarely.
    """
    is_punct, ascii_table = _punctuation()
    if not text.isascii():  # ASCII is NFKC already
        text = unicodedata.normalize("NFKC", text)
    text = text.lower()
    if text.isascii():
        text = text.translate(ascii_table)  # CPython's fast path for ASCII
    else:  # one vectorised lookup over the code points (str.translate or re take ~100 ns a character)
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).copy()
        cps[is_punct[cps]] = 32
        text = cps.tobytes().decode("utf-32-le", "surrogatepass")
    return " ".join(text.split())


def _exact_normalized(normalized: str) -> int:
    data = normalized.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def exact_hash(text: str) -> int:
    """64-bit hash (0 <= h < 2**64) of the normalised text: BLAKE2b, so stable across processes, machines and
    Python versions (never Python's salted ``hash()``). Collisions: ~n**2 / 2**65, i.e. about one pair in
    a corpus of a billion documents."""
    return _exact_normalized(normalize_for_dedup(text))


# ----------------------------------------------------------------------------------------------------------
# Shingles


def _word_spans(data: bytes, ngram: int) -> tuple[list[int], list[int]]:
    """Byte spans of the word n-grams of normalised UTF-8 text (words separated by single spaces).

    A text of fewer than `ngram` words gives one span covering all of it (possibly empty)."""
    spaces = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 32)
    if len(spaces) + 1 < ngram:
        return [0], [len(data)]
    starts = np.empty(len(spaces) + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:] = spaces + 1
    ends = np.empty(len(spaces) + 1, dtype=np.int64)
    ends[:-1] = spaces
    ends[-1] = len(data)
    return starts[: len(starts) - ngram + 1].tolist(), ends[ngram - 1 :].tolist()


def shingles(text: str, ngram: int = 5) -> list[bytes]:
    """Word n-grams of the normalised text as UTF-8 bytes, in order (repeats kept; MinHash ignores them).

    A document of fewer than `ngram` words gives one shingle of all its words (``b""`` for an empty one)."""
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    data = normalize_for_dedup(text).encode("utf-8", "surrogatepass")
    starts, ends = _word_spans(data, ngram)
    return [data[s:e] for s, e in zip(starts, ends, strict=True)]


# ----------------------------------------------------------------------------------------------------------
# MinHash signatures, compatible with datasketch

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64((1 << 32) - 1)
_SCHEMES = ("affine32", "legacy", "affine64")


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch applies it (uint32 wraparound)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


class MinHasher:
    """MinHash signatures of documents' word n-gram shingles, vectorised with numpy.

    ``signature(text)`` equals ``datasketch.MinHash(num_perm, seed, scheme=scheme)`` after ``update(s)`` for
    every ``s in shingles(text, ngram)``, bit for bit. Cheap to construct and picklable (ship it to workers).
    ``chunk`` bounds the working buffer: at most ``num_perm x chunk`` permuted values at a time.
    """

    def __init__(
        self, num_perm: int = 128, ngram: int = 5, seed: int = 1, scheme: str = "affine32", chunk: int = 8192
    ) -> None:
        if scheme not in _SCHEMES:
            raise ValueError(f"scheme must be one of {_SCHEMES}, got {scheme!r}")
        if num_perm < 1 or ngram < 1 or chunk < 1:
            raise ValueError("num_perm, ngram and chunk must be >= 1")
        self.num_perm, self.ngram, self.seed, self.scheme, self.chunk = num_perm, ngram, seed, scheme, chunk
        gen = np.random.RandomState(seed)
        if scheme == "legacy":
            # datasketch draws (a, b) pairs interleaved, one pair per permutation.
            ab = np.array(
                [
                    (gen.randint(1, _MERSENNE, dtype=np.uint64), gen.randint(0, _MERSENNE, dtype=np.uint64))
                    for _ in range(num_perm)
                ],
                dtype=np.uint64,
            )
            self._a, self._b = ab[:, 0].copy(), ab[:, 1].copy()
            self.dtype = np.dtype(np.uint64)
            self.max_hash = int(_MAX32)
        else:
            width = 32 if scheme == "affine32" else 64
            dt = np.uint32 if width == 32 else np.uint64
            self._a = gen.randint(0, 1 << (width - 1), num_perm, dtype=dt) * dt(2) + dt(1)
            self._b = gen.randint(0, 1 << width, num_perm, dtype=dt)
            self.dtype = np.dtype(dt)
            self.max_hash = (1 << width) - 1

    def config(self) -> dict:
        return {"num_perm": self.num_perm, "ngram": self.ngram, "seed": self.seed, "scheme": self.scheme}

    def __repr__(self) -> str:
        return "MinHasher(" + ", ".join(f"{k}={v!r}" for k, v in self.config().items()) + ")"

    # -- hashing ------------------------------------------------------------------------------------------

    def _shingle_hashes(self, normalized: str) -> np.ndarray:
        """datasketch's sha1_hash32 (or sha1_hash64 for affine64) of every shingle, as one array."""
        data = normalized.encode("utf-8", "surrogatepass")
        starts, ends = _word_spans(data, self.ngram)
        sha1 = hashlib.sha1
        digests = b"".join([sha1(data[s:e]).digest() for s, e in zip(starts, ends, strict=True)])
        if self.scheme == "affine64":
            raw = np.frombuffer(digests, dtype=np.uint8).reshape(-1, 20)[:, :8]
            return np.ascontiguousarray(raw).view("<u8").ravel().astype(np.uint64)
        # 20-byte digests = 5 little-endian uint32 words; datasketch keeps the first.
        return np.frombuffer(digests, dtype="<u4").reshape(-1, 5)[:, 0].astype(self.dtype)

    def _permute(self, hv: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Permuted values, shape (num_perm, len(hv)) in `out`, with datasketch's exact integer arithmetic.

        Permutations along rows: the per-document minimum is then a reduction along contiguous memory
        (~10x faster than reducing along axis 0 of the transposed layout)."""
        out = out[:, : len(hv)]
        a, b = self._a[:, None], self._b[:, None]
        if self.scheme == "legacy":
            # (a*h + b) mod (2**61 - 1), computed in wrapping uint64 like datasketch, then & (2**32 - 1).
            # x mod p for p = 2**61 - 1 and x < 2**64: (x & p) + (x >> 61) < 2p, so one conditional subtract.
            np.multiply(a, hv[None, :], out=out)
            np.add(out, b, out=out)
            hi = out >> np.uint64(61)
            np.bitwise_and(out, _MERSENNE, out=out)
            np.add(out, hi, out=out)
            np.subtract(out, _MERSENNE, out=out, where=out >= _MERSENNE)
            np.bitwise_and(out, _MAX32, out=out)
        else:
            h = _fmix32(hv) if self.scheme == "affine32" else _fmix64(hv)
            np.multiply(a, h[None, :], out=out)
            np.add(out, b, out=out)
        return out

    def _reduce(self, hashes: list[np.ndarray], out: np.ndarray, buf: np.ndarray) -> None:
        """Column-wise minimum of each document's permuted hashes into the rows of `out`."""
        lengths = np.fromiter((len(h) for h in hashes), dtype=np.int64, count=len(hashes))
        starts = np.zeros(len(hashes), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        allh = np.concatenate(hashes)
        for p0 in range(0, len(allh), self.chunk):
            p1 = min(p0 + self.chunk, len(allh))
            phv = self._permute(allh[p0:p1], buf)
            d0 = int(np.searchsorted(starts, p0, side="right")) - 1
            d1 = int(np.searchsorted(starts, p1, side="left"))
            seg = np.maximum(starts[d0:d1], p0) - p0
            np.minimum(out[d0:d1], np.minimum.reduceat(phv, seg, axis=1).T, out=out[d0:d1])

    def _signatures_normalized(self, normalized: Iterable[str]) -> np.ndarray:
        rows: list[np.ndarray] = []
        buf = np.empty((self.num_perm, self.chunk), dtype=self.dtype)
        pending: list[np.ndarray] = []
        pending_len = 0

        def flush() -> None:
            nonlocal pending, pending_len
            if pending:
                out = np.full((len(pending), self.num_perm), self.max_hash, dtype=self.dtype)
                self._reduce(pending, out, buf)
                rows.append(out)
            pending, pending_len = [], 0

        for norm in normalized:
            h = self._shingle_hashes(norm)
            pending.append(h)
            pending_len += len(h)
            if pending_len >= self.chunk:
                flush()
        flush()
        if not rows:
            return np.empty((0, self.num_perm), dtype=self.dtype)
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def signatures(self, texts: Iterable[str]) -> np.ndarray:
        """Signatures of many texts, shape ``(n, num_perm)``, dtype uint32 (affine32) or uint64."""
        return self._signatures_normalized(normalize_for_dedup(t) for t in texts)

    def fingerprints(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(`exact_hash` of each text as uint64, `signatures`), normalising each text once for both."""
        normalized = [normalize_for_dedup(t) for t in texts]
        exact = np.fromiter(map(_exact_normalized, normalized), dtype=np.uint64, count=len(normalized))
        return exact, self._signatures_normalized(normalized)

    def signature(self, text: str) -> np.ndarray:
        """Signature of one text, shape ``(num_perm,)``: datasketch's ``MinHash.hashvalues``."""
        return self.signatures([text])[0]


# ----------------------------------------------------------------------------------------------------------
# LSH parameters


def lsh_recall(similarity: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """Probability that a pair of Jaccard similarity `s` shares at least one band: ``1 - (1 - s**r)**b``."""
    s = np.asarray(similarity, dtype=np.float64)
    p = 1.0 - (1.0 - s**rows) ** bands
    return float(p) if p.ndim == 0 else p


def banding(threshold: float, num_perm: int, bands: int | None, rows: int | None) -> tuple[int, int]:
    """The bands and rows given (both or neither), else `lsh_params`'s choice for ``threshold``; checked
    against the number of permutations."""
    if (bands is None) != (rows is None):
        raise ValueError("give both bands and rows, or neither")
    if bands is None or rows is None:
        bands, rows = lsh_params(threshold, num_perm)
    if bands < 1 or rows < 1 or bands * rows > num_perm:
        raise ValueError(f"{bands} bands x {rows} rows does not fit {num_perm} permutations")
    return bands, rows


def lsh_params(threshold: float, num_perm: int, min_recall: float = 0.95) -> tuple[int, int]:
    """Bands and rows for a Jaccard threshold, chosen explicitly (never datasketch's automatic choice).

    Rule: use as many permutations as possible (``bands = num_perm // rows``) and take the *largest*
    ``rows`` whose S-curve ``1 - (1 - t**rows)**bands`` still reaches `min_recall` at the threshold ``t``.
    Larger rows make the curve steeper, so pairs well below the threshold become candidates less often
    (fewer pairs to verify); the recall constraint keeps pairs at the threshold. Candidates are verified
    afterwards, so false positives cost time, not correctness. Examples (num_perm=128, min_recall=0.95):

    =========  ============  =============  ========  ======  =========================
    threshold  bands x rows  recall S(t)    S(t-0.1)  S(0.5)  note
    =========  ============  =============  ========  ======  =========================
    0.9        10 x 12       0.964          0.51      0.002
    0.8        18 x 7        0.986          0.79      0.13    16 x 8 gives only 0.947
    0.7        25 x 5        0.990          0.87      0.55
    0.5        42 x 3        0.996          0.94      0.996
    =========  ============  =============  ========  ======  =========================

    datasketch's ``MinHashLSH(threshold=0.8, num_perm=128)`` picks 9 x 13 (recall 0.40 at 0.8).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if not 0.0 < min_recall < 1.0:
        raise ValueError(f"min_recall must be in (0, 1), got {min_recall}")
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if lsh_recall(threshold, bands, rows) >= min_recall:
            return bands, rows
    raise ValueError(f"no banding of {num_perm} permutations reaches recall {min_recall} at {threshold}")


# ----------------------------------------------------------------------------------------------------------
# Keys and per-shard signature files

_DOC_BITS = 32


def pack_keys(shard: int | np.ndarray, doc: int | np.ndarray) -> np.ndarray:
    """int64 keys ``shard << 32 | doc``; their order is the order of (shard, doc) pairs."""
    shard = np.asarray(shard, dtype=np.int64)
    doc = np.asarray(doc, dtype=np.int64)
    if np.any(shard < 0) or np.any(shard >= 1 << 31) or np.any(doc < 0) or np.any(doc >= 1 << _DOC_BITS):
        raise ValueError("keys need 0 <= shard < 2**31 and 0 <= doc < 2**32")
    return (shard << _DOC_BITS) | doc


def unpack_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard, doc) arrays from packed int64 keys."""
    keys = np.asarray(keys, dtype=np.int64)
    return keys >> _DOC_BITS, keys & ((1 << _DOC_BITS) - 1)


def _as_keys(keys) -> np.ndarray:
    """Packed int64 keys from an integer array (used as is) or (shard, doc) pairs (packed)."""
    arr = np.asarray(keys)
    if arr.ndim == 2 and arr.shape[1] == 2:
        return pack_keys(arr[:, 0], arr[:, 1])
    if arr.ndim == 1 and (arr.dtype.kind in "iu" or len(arr) == 0):
        if arr.dtype == np.uint64 and len(arr) and int(arr.max()) >= 1 << 63:
            raise ValueError("keys must fit in int64")
        return arr.astype(np.int64)
    raise TypeError("keys must be a 1-D integer array or a sequence of (shard, doc) pairs")


_CONFIG_KEYS = ("num_perm", "ngram", "seed", "scheme")


def write_signatures(
    path: str | os.PathLike, doc: np.ndarray, exact: np.ndarray, sig: np.ndarray, config: dict
) -> Path:
    """Write one shard's arrays atomically (temp + rename) as an uncompressed ``.npz`` whose members can be
    memory-mapped (`SignatureFile`).

    Members: ``doc`` (int64 document indices), ``exact`` (uint64), ``sigT`` (the signatures *transposed*,
    shape ``(num_perm, n)``: one band's values are then a contiguous block of rows, so a bucket task reads
    only its columns of every shard) and the hasher's config, so that shards made with different settings
    are refused when read together.
    """
    path = Path(path)
    doc = np.asarray(doc, dtype=np.int64).reshape(-1)
    exact = np.asarray(exact, dtype=np.uint64).reshape(-1)
    if sig.ndim != 2 or len(sig) != len(doc) or len(exact) != len(doc):
        raise ValueError(f"{len(doc)} documents, {len(exact)} exact hashes, signatures of shape {sig.shape}")
    if len(doc) and (doc.min() < 0 or doc.max() >= 1 << _DOC_BITS):
        raise ValueError("document indices must be in [0, 2**32)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                doc=doc,
                exact=exact,
                sigT=np.ascontiguousarray(sig.T),
                **{k: (np.str_(config[k]) if k == "scheme" else np.int64(config[k])) for k in _CONFIG_KEYS},
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _npz_member(path: Path, name: str) -> np.ndarray:
    """A read-only memory map of one stored (uncompressed) ``.npy`` member of an ``.npz`` file."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: member {name} is compressed and cannot be memory-mapped")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: name and extra-field lengths at bytes 26-29
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: damaged zip header for {name}")
        skip = int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + skip)
        version = np.lib.format.read_magic(f)
        fmt = np.lib.format
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran:
        raise ValueError(f"{path}: member {name} is Fortran-ordered")
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class SignatureFile:
    """One shard's signature file, memory-mapped: nothing is read until a slice of it is used.

    ``doc``, ``exact``: per-document arrays; `columns` (a band's rows of the transposed matrix) and `rows`
    (full signatures of some documents) read only what they return. Drop the object to unmap the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with np.load(self.path, allow_pickle=False) as z:
            self.config = {k: z[k].item() for k in _CONFIG_KEYS}
            names = set(z.files)
        if "sigT" not in names:
            raise ValueError(f"{self.path}: no 'sigT' member (written by an older llmforge? rerun process)")
        self.doc = _npz_member(self.path, "doc")
        self.exact = _npz_member(self.path, "exact")
        self.sigT = _npz_member(self.path, "sigT")
        self.num_perm = int(self.config["num_perm"])

    def __len__(self) -> int:
        return len(self.doc)

    def columns(self, lo: int, hi: int) -> np.ndarray:
        """Signature values lo..hi-1 of every document, shape ``(hi - lo, n)`` (contiguous on disk)."""
        return self.sigT[lo:hi]

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Full signatures of the documents at positions `index`, shape ``(len(index), num_perm)``."""
        return np.ascontiguousarray(self.sigT[:, np.asarray(index, dtype=np.int64)].T)


def save_signatures(
    path: str | os.PathLike, keys: Sequence[int] | np.ndarray, texts: Iterable[str], hasher: MinHasher
) -> Path:
    """One shard's exact hashes and signatures, written atomically to `path` (`write_signatures`).

    `keys` are the documents' indices within the shard (0 <= doc < 2**32).
    """
    doc = np.asarray(keys, dtype=np.int64).reshape(-1)
    texts = list(texts)
    if len(texts) != len(doc):
        raise ValueError(f"{len(doc)} keys for {len(texts)} texts")
    exact, sig = hasher.fingerprints(texts)
    return write_signatures(path, doc, exact, sig, hasher.config())


def load_signatures(
    paths: Sequence[str | os.PathLike], shards: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate per-shard signature files into ``(keys int64, exact_hashes uint64, signatures)``.

    Keys are ``shard << 32 | doc`` (see `pack_keys`), where the shard index is the file's position in
    `paths` unless `shards` gives it; pass the files in a fixed order (e.g. sorted by name) so that "keep
    the smallest key" means the same document on every run. Files written with different hasher settings
    are refused. This holds every signature in memory: the distributed stages (`llmforge.prep.dedup_tasks`)
    read the files memory-mapped instead.
    """
    if not paths:
        raise ValueError("no signature files given")
    if shards is not None and len(shards) != len(paths):
        raise ValueError(f"{len(shards)} shard indices for {len(paths)} files")
    files = [SignatureFile(p) for p in paths]
    for f in files[1:]:
        if f.config != files[0].config:
            raise ValueError(f"{f.path}: hasher settings {f.config} differ from {files[0].config}")
    dtype = np.uint32 if files[0].config["scheme"] == "affine32" else np.uint64
    keys = [pack_keys(i if shards is None else int(shards[i]), f.doc) for i, f in enumerate(files)]
    sigs = np.empty((sum(len(f) for f in files), files[0].num_perm), dtype=dtype)
    row = 0
    for f in files:
        sigs[row : row + len(f)] = f.sigT.T
        row += len(f)
    exact = np.concatenate([np.asarray(f.exact, dtype=np.uint64) for f in files])
    return np.concatenate(keys), exact, sigs


# ----------------------------------------------------------------------------------------------------------
# The global stage


@dataclass
class DedupResult:
    """What to drop. Arrays are parallel and sorted by key.

    drop: keys of the documents to drop (int64, packed as the input keys were, see `pack_keys`).
    kept_for: for each dropped document, the key of the kept document of its cluster.
    exact: True where the document was dropped as an exact duplicate, False for a near duplicate.
    """

    drop: np.ndarray
    kept_for: np.ndarray
    exact: np.ndarray
    documents: int
    exact_dropped: int
    near_dropped: int
    candidate_pairs: int
    verified_pairs: int
    clusters: int
    bands: int
    rows: int
    threshold: float
    verify_threshold: float

    def drop_set(self) -> set[int]:
        return set(self.drop.tolist())

    def drop_pairs(self) -> set[tuple[int, int]]:
        """The dropped keys as (shard, doc) pairs."""
        shard, doc = unpack_keys(self.drop)
        return set(zip(shard.tolist(), doc.tolist(), strict=True))

    def for_shard(self, shard: int) -> np.ndarray:
        """Sorted document indices to drop from one shard (what its filtering pass needs)."""
        s, d = unpack_keys(self.drop)
        return d[s == shard]

    def stats(self) -> dict:
        return {
            "documents": self.documents,
            "exact_dropped": self.exact_dropped,
            "near_dropped": self.near_dropped,
            "candidate_pairs": self.candidate_pairs,
            "verified_pairs": self.verified_pairs,
            "clusters": self.clusters,
            "bands": self.bands,
            "rows": self.rows,
            "threshold": self.threshold,
            "verify_threshold": self.verify_threshold,
        }


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique for a 1-D integer array, by sorting (numpy 2.3+'s hash-based np.unique was ~50x slower
    on millions of pair codes)."""
    x = np.sort(x)
    if len(x) > 1:
        x = x[np.concatenate(([True], x[1:] != x[:-1]))]
    return x


def _band_hash(cols: np.ndarray, salt: int) -> np.ndarray:
    """64-bit hash of each row of a (n, rows) block of signature values (collisions are verified away)."""
    h = np.full(len(cols), np.uint64(salt * 0x9E3779B97F4A7C15 % (1 << 64)), dtype=np.uint64)
    for j in range(cols.shape[1]):
        h ^= cols[:, j].astype(np.uint64)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(31)
    return _fmix64(h)


def _window_pairs(hs: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, of positions of equal values in a *sorted* array of band hashes.

    Within a bucket (a run of equal values, in the order given), each position is paired with up to
    `window` positions before it and with the bucket's first position: every pair for buckets of up to
    window + 1 rows, O(n * window) pairs for huge ones (templated pages) instead of O(n**2). Only
    positions inside the bucket are used, so a sorted array cut between buckets gives the same pairs.
    """
    n = len(hs)
    idx = np.arange(n)
    is_start = np.ones(n, dtype=bool)
    is_start[1:] = hs[1:] != hs[:-1]
    gstart = np.maximum.accumulate(np.where(is_start, idx, 0))
    rank = idx - gstart
    cnt = np.minimum(rank, window)
    sel = cnt > 0
    if not sel.any():
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    pos, c = idx[sel], cnt[sel]
    right = np.repeat(pos, c)
    offsets = np.cumsum(c) - c
    left = right - (np.arange(len(right)) - np.repeat(offsets, c) + 1)
    far = rank > window
    return np.concatenate([left, gstart[far]]), np.concatenate([right, idx[far]])


def _bucket_pairs(h: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, of rows with equal band hash (`_window_pairs` over rows in ascending order)."""
    order = np.argsort(h, kind="stable")  # ties stay in row (= key) order
    left, right = _window_pairs(h[order], window)
    return order[left].astype(np.int64), order[right].astype(np.int64)


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label of each of n nodes = the smallest node of its connected component (edges a-b)."""
    parent = np.arange(n, dtype=np.int64)
    if len(a) == 0:
        return parent
    while True:
        pa, pb = parent[a], parent[b]
        if np.array_equal(pa, pb):
            return parent
        lo, hi = np.minimum(pa, pb), np.maximum(pa, pb)
        np.minimum.at(parent, hi, lo)  # hook roots onto smaller roots: parent[x] <= x always
        while True:  # pointer jumping until every node points at a root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt


def find_duplicates(
    keys,
    exact_hashes,
    signatures: np.ndarray,
    threshold: float = 0.8,
    bands: int | None = None,
    rows: int | None = None,
    *,
    verify_threshold: float | None = None,
    near: bool = True,
    bucket_window: int = 64,
    pair_chunk: int = 16384,
) -> DedupResult:
    """Decide which documents to drop as exact or near duplicates (the global stage).

    keys: unique sortable ids, packed int64 (``load_signatures``, `pack_keys`) or (shard, doc) pairs.
    exact_hashes: `exact_hash` of each document (uint64). signatures: (n, num_perm) from one `MinHasher`.
    bands, rows: LSH banding (both or neither; default `lsh_params(threshold, num_perm)`).
    verify_threshold: candidate pairs are kept when their estimated Jaccard (share of equal signature
    values) is >= this (default `threshold`). With 128 permutations the estimate's standard deviation is
    ~0.035 at J=0.8, so pairs just above the threshold are sometimes rejected and pairs just below it
    sometimes accepted; see experiments/LEDGER.md for measured recall and precision.
    near: False finds exact duplicates only (``dedup.near=false``): no banding, no verification.

    The result depends only on the keys and the data, not on the order of the rows.
    """
    keys = _as_keys(keys)
    exact_hashes = np.asarray(exact_hashes, dtype=np.uint64).reshape(-1)
    signatures = np.asarray(signatures)
    n = len(keys)
    if signatures.ndim != 2 or len(signatures) != n or len(exact_hashes) != n:
        shape = signatures.shape
        raise ValueError(f"{n} keys, {len(exact_hashes)} exact hashes, signatures of shape {shape}")
    num_perm = signatures.shape[1]
    bands, rows = banding(threshold, num_perm, bands, rows)
    vt = threshold if verify_threshold is None else verify_threshold
    if not 0.0 <= vt <= 1.0:
        raise ValueError(f"verify_threshold must be in [0, 1], got {vt} (near=False turns near copies off)")
    need = math.ceil(vt * num_perm - 1e-9)  # equal values needed: estimated J >= vt

    # Canonical order: by key. Every later tie is broken by row index, i.e. by key.
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    if n > 1 and np.any(keys[1:] == keys[:-1]):
        raise ValueError("keys must be unique")
    exact_hashes = exact_hashes[order]

    # 1. Exact duplicates: equal hash of the normalised text -> keep the smallest key.
    by_hash = np.argsort(exact_hashes, kind="stable")
    hs = exact_hashes[by_hash]
    first = np.ones(n, dtype=bool)
    first[1:] = hs[1:] != hs[:-1]
    group_head = by_hash[np.maximum.accumulate(np.where(first, np.arange(n), 0))]
    rep = np.empty(n, dtype=np.int64)
    rep[by_hash] = group_head  # each row's exact representative (itself when unique)
    survivors = np.flatnonzero(rep == np.arange(n))
    src = order[survivors]  # survivor i (in key order) is row src[i] of `signatures`, never copied whole
    m = len(survivors)

    # 2. LSH banding over the survivors, candidate pairs deduplicated across bands.
    code = np.empty(0, dtype=np.int64)  # pair (a, b), a < b, as a * m + b; merged band by band
    for band in range(bands if near else 0):
        block = signatures[src, band * rows : (band + 1) * rows]
        a, b = _bucket_pairs(_band_hash(block, band), bucket_window)
        if len(a):
            code = _sorted_unique(np.concatenate([code, a * m + b]))
    a_all, b_all = code // max(m, 1), code % max(m, 1)

    # 3. Verification by the estimated Jaccard over all num_perm values.
    keep = np.zeros(len(code), dtype=bool)
    for s in range(0, len(code), pair_chunk):
        a, b = a_all[s : s + pair_chunk], b_all[s : s + pair_chunk]
        equal = signatures[src[a]] == signatures[src[b]]
        keep[s : s + pair_chunk] = np.count_nonzero(equal, axis=1) >= need
    va, vb = a_all[keep], b_all[keep]

    # 4. Clusters: connected components, each kept at its smallest key.
    root = _components(m, va, vb)
    near_rep = np.arange(n, dtype=np.int64)
    near_rep[survivors] = survivors[root]
    final = near_rep[rep]  # exact duplicates follow their representative's cluster
    dropped = np.flatnonzero(final != np.arange(n))
    is_exact = rep[dropped] != dropped
    near_dropped = int(np.count_nonzero(root != np.arange(m)))
    return DedupResult(
        drop=keys[dropped],
        kept_for=keys[final[dropped]],
        exact=is_exact,
        documents=n,
        exact_dropped=int(np.count_nonzero(is_exact)),
        near_dropped=near_dropped,
        candidate_pairs=len(code),
        verified_pairs=int(np.count_nonzero(keep)),
        clusters=len(_sorted_unique(root[root != np.arange(m)])),
        bands=bands,
        rows=rows,
        threshold=threshold,
        verify_threshold=vt,
    )
