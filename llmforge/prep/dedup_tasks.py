"""Deduplication as bounded-memory tasks: the global decision of `find_duplicates`, same bytes, at any scale.

`find_duplicates` holds every signature of the corpus in one process (~0.5 KB a document at 128
permutations): a Common Crawl snapshot (1-3 billion documents after extraction) would need terabytes of RAM.
Here the same decision is split into stages of independent tasks that run on the data stage's executor
(local processes, SLURM arrays), each reading the per-shard signature files memory-mapped
(`llmforge.prep.dedup.SignatureFile`) and holding at most ``memory_gb`` of records at a time:

1. ``exact`` (T tasks, a hash range each): every shard's exact hashes in the task's range, sorted by
   (hash, key) with an external sort (`SortedRecords`); in each group of equal hashes the smallest key is
   the representative, the others are written as (duplicate, representative) pairs.
2. ``bucket`` (T tasks, units ``t, t + T, ...`` of the (band, band-key range) units, one range per band
   unless there are more tasks than bands): for one unit at a time, the band's rows of every shard's
   transposed signatures (contiguous on disk), hashed to one 64-bit band key per document, the keys in the
   unit's range kept; exact duplicates are left out, as `find_duplicates` leaves them out. Records (band
   key, document key) are sorted externally (sorted runs of ``memory_gb`` spilled to disk, then a chunked
   k-way merge that cuts only between buckets), and candidate pairs come out of each bucket with the same
   window rule as `find_duplicates`. Pairs are written split into T partitions by a hash of their first key.
3. ``verify`` (T tasks, a partition each): the partition's candidate pairs, deduplicated across bands,
   verified against the signatures (estimated Jaccard >= the threshold), read by gathering the two
   documents' columns from their shards' files. A partition larger than ``memory_gb`` is read in several
   passes, each a sub-partition of its pairs (by another part of the first key's hash).
4. ``components`` (one task): connected components over the verified pairs only (memory proportional to the
   number of pairs, not of documents), the smallest key kept; exact duplicates follow their
   representative's cluster. Writes the drop list, and the audit trail: for every removed document its
   survivor, whether it was an exact duplicate and the Jaccard similarity to the survivor estimated from
   their signatures.

Every task writes its output under a temporary name, renames it, then writes a ``.done`` marker holding the
hash of the plan and of the inputs (the pipeline's marker contract), so a rerun skips finished tasks. The
result is byte-identical to `find_duplicates` for any number of tasks: groups are processed in (hash, key)
order exactly as the single-process sort orders them, and pairs are a set (duplicates across bands and
partitions change nothing). tests/test_dedup_tasks.py and experiments/bench_dedup_scale.py check this.

Memory of a task: ``memory_gb`` of records (48 bytes a record while sorting), plus one shard's band (or
exact) column; for ``verify``, half of ``memory_gb`` of candidate pairs (64 bytes a pair while
deduplicating) and a quarter for the gathered signatures of a chunk of pairs, plus one shard's file mapped;
for ``components``, the verified pairs and exact duplicates (the one stage whose memory grows with the
corpus: with the number of duplicate pairs). Disk: the spilled runs (16 bytes a document per
band being sorted, deleted after the band), candidate and verified pairs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmforge.prep.dedup import (
    DedupResult,
    SignatureFile,
    _band_hash,
    _components,
    _fmix64,
    _window_pairs,
    banding,
    pack_keys,
)

__all__ = ["DedupPlan", "SortedRecords", "load_result", "make_plan", "run_dedup"]

RECORD_BYTES = 48  # a (hash, key) record while sorting: the two arrays, the order and the sorted copies
PAIR_BYTES = 64  # a candidate pair while deduplicating: the pair, its sorted copy, the order and the mask
_DOC_MASK = (1 << 32) - 1


@dataclass(frozen=True)
class DedupPlan:
    """Everything a task needs (small and picklable, shipped to every worker)."""

    work: str  # the stages' directory
    paths: tuple[str, ...]  # signature files, in ascending shard order
    shards: tuple[int, ...]
    num_perm: int
    bands: int
    rows: int
    threshold: float
    verify_threshold: float
    tasks: int
    memory_bytes: int
    exact: bool = True
    near: bool = True
    window: int = 64
    inputs: str = ""  # a hash of the inputs (the upstream markers), part of every marker

    def digest(self, *extra: object) -> str:
        from llmforge.prep.pipeline import digest

        fields = {k: v for k, v in self.__dict__.items() if k not in ("work", "memory_bytes")}
        return digest(fields, *extra)

    @property
    def need(self) -> int:
        """Equal signature values needed for an estimated Jaccard >= verify_threshold (as find_duplicates)."""
        return math.ceil(self.verify_threshold * self.num_perm - 1e-9)


def make_plan(
    work: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    shards: Sequence[int] | None = None,
    *,
    threshold: float = 0.8,
    bands: int | None = None,
    rows: int | None = None,
    verify_threshold: float | None = None,
    tasks: int = 1,
    memory_gb: float = 1.0,
    exact: bool = True,
    near: bool = True,
    window: int = 64,
    inputs: str | None = None,
) -> DedupPlan:
    """A plan over per-shard signature files (`llmforge.prep.dedup.write_signatures`).

    `shards` gives each file's shard index (default: its position); keys are ``shard << 32 | doc`` as in
    `load_signatures`. `inputs` identifies the inputs' content for the markers (default: the files' sizes
    and modification times).
    """
    shards = list(range(len(paths))) if shards is None else [int(s) for s in shards]
    if len(shards) != len(paths):
        raise ValueError(f"{len(shards)} shard indices for {len(paths)} files")
    if len(set(shards)) != len(shards):
        raise ValueError("shard indices must be unique")
    order = sorted(range(len(paths)), key=lambda i: shards[i])
    files = [str(Path(paths[i]).resolve()) for i in order]
    configs = [SignatureFile(p).config for p in files[:1]] if files else [{"num_perm": 128}]
    for p in files[1:]:
        cfg = SignatureFile(p).config
        if cfg != configs[0]:
            raise ValueError(f"{p}: hasher settings {cfg} differ from {configs[0]}")
    num_perm = int(configs[0]["num_perm"])
    bands, rows = banding(threshold, num_perm, bands, rows)
    if verify_threshold is not None and not 0.0 <= verify_threshold <= 1.0:
        raise ValueError(f"verify_threshold must be in [0, 1], got {verify_threshold}")
    if tasks < 1 or memory_gb <= 0:
        raise ValueError(f"tasks must be >= 1 and memory_gb > 0, got {tasks} and {memory_gb}")
    if inputs is None:
        from llmforge.prep.pipeline import digest, fingerprint

        inputs = digest([fingerprint(p) for p in files], configs[0])
    return DedupPlan(
        work=str(work),
        paths=tuple(files),
        shards=tuple(shards[i] for i in order),
        num_perm=num_perm,
        bands=int(bands),
        rows=int(rows),
        threshold=float(threshold),
        verify_threshold=float(threshold if verify_threshold is None else verify_threshold),
        tasks=int(tasks),
        memory_bytes=int(memory_gb * (1 << 30)),
        exact=exact,
        near=near,
        window=window,
        inputs=inputs,
    )


# ----------------------------------------------------------------------------------------------------------
# External sort of (hash, key) records


@dataclass
class SortedRecords:
    """(hash uint64, key int64) records, added with keys in ascending order, read back as chunks sorted by
    (hash, key) that each hold whole groups of equal hashes.

    Records stay in memory up to ``budget`` bytes (`RECORD_BYTES` a record); beyond that each full buffer is
    sorted and spilled to ``spill_dir`` as a run, and `chunks` merges the runs k-way, a bounded window of
    each run at a time (read from the files, not paged in through the maps), cutting only below the
    smallest hash not yet read from some run, so no group is split. Chunks hold at most half the capacity,
    so that what a task derives from a chunk fits next to it. (A single group larger than that is read
    whole: memory then grows with that group.)
    """

    spill_dir: Path
    budget: int
    _h: list[np.ndarray] = field(default_factory=list)
    _k: list[np.ndarray] = field(default_factory=list)
    _size: int = 0
    runs: int = 0
    spilled_bytes: int = 0

    @property
    def capacity(self) -> int:
        return max(1024, self.budget // RECORD_BYTES)

    def add(self, h: np.ndarray, k: np.ndarray) -> None:
        self._h.append(np.asarray(h, dtype=np.uint64))
        self._k.append(np.asarray(k, dtype=np.int64))
        self._size += len(h)
        if self._size >= self.capacity:
            self._spill()

    def _sorted_buffer(self) -> tuple[np.ndarray, np.ndarray]:
        h = np.concatenate(self._h) if self._h else np.empty(0, np.uint64)
        k = np.concatenate(self._k) if self._k else np.empty(0, np.int64)
        self._h, self._k, self._size = [], [], 0
        order = np.argsort(h, kind="stable")  # keys arrive ascending: ties stay in key order
        return h[order], k[order]

    def _spill(self) -> None:
        h, k = self._sorted_buffer()
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        np.save(self.spill_dir / f"run{self.runs:05d}.h.npy", h)
        np.save(self.spill_dir / f"run{self.runs:05d}.k.npy", k)
        self.runs += 1
        self.spilled_bytes += h.nbytes + k.nbytes

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Chunks of at most half the capacity (unless one group is larger), so what the reader computes
        from a chunk fits the budget next to it."""
        size = max(1, self.capacity // 2)
        if self.runs == 0:
            h, k = self._sorted_buffer()
            yield from _group_slices(h, k, size)
            return
        if self._size:
            self._spill()
        hs = [np.load(self.spill_dir / f"run{r:05d}.h.npy", mmap_mode="r") for r in range(self.runs)]
        ks = [np.load(self.spill_dir / f"run{r:05d}.k.npy", mmap_mode="r") for r in range(self.runs)]
        pos = [0] * self.runs
        step = max(1, size // self.runs)
        while any(p < len(h) for p, h in zip(pos, hs, strict=True)):
            # the smallest "last hash read" over the runs that still have records beyond their window
            bound = None
            for p, h in zip(pos, hs, strict=True):
                if p + step < len(h):
                    last = h[p + step - 1]
                    bound = last if bound is None or last < bound else bound
            ends = []
            for p, h in zip(pos, hs, strict=True):
                ends.append(len(h) if bound is None else p + int(np.searchsorted(h[p:], bound, "left")))
            if bound is not None and all(e == p for e, p in zip(ends, pos, strict=True)):
                # every record below `bound` is out: the next group (hash == bound) is read whole
                ends = [p + int(np.searchsorted(h[p:], bound, "right")) for p, h in zip(pos, hs, strict=True)]
            # runs hold ascending key ranges: concatenated in run order, a stable sort by hash is (hash, key);
            # windows are read, not touched through the maps, so the runs' pages do not pile up in memory
            h = np.concatenate([_read(h, p, e) for h, p, e in zip(hs, pos, ends, strict=True)])
            k = np.concatenate([_read(k, p, e) for k, p, e in zip(ks, pos, ends, strict=True)])
            pos = ends
            order = np.argsort(h, kind="stable")
            h, k = h[order], k[order]
            del order
            yield h, k
        del hs, ks
        shutil.rmtree(self.spill_dir, ignore_errors=True)
        self.runs = 0


def _group_slices(h: np.ndarray, k: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive slices of sorted records, at most `size` each, cut only between groups of equal hashes
    (a group larger than `size` is one slice)."""
    start, n = 0, len(h)
    while start < n:
        end = min(start + size, n)
        if end < n:
            cut = start + int(np.searchsorted(h[start:end], h[end], "left"))
            end = cut if cut > start else start + int(np.searchsorted(h[start:], h[start], "right"))
        yield h[start:end], k[start:end]
        start = end


def _read(mapped: np.memmap, lo: int, hi: int) -> np.ndarray:
    """Items lo..hi-1 of a memory-mapped .npy file, read from the file (not paged in through the map)."""
    if hi <= lo:
        return np.empty(0, dtype=mapped.dtype)
    offset = mapped.offset + lo * mapped.dtype.itemsize
    return np.fromfile(mapped.filename, dtype=mapped.dtype, count=hi - lo, offset=offset)


# ----------------------------------------------------------------------------------------------------------
# Small helpers


def _dir(plan: DedupPlan, stage: str) -> Path:
    path = Path(plan.work) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def _spill_dir(parent: Path, prefix: str) -> Path:
    """A fresh directory for a task's sorted runs; a killed earlier try's leftovers are removed first."""
    for stale in parent.glob(prefix + ".*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=prefix + ".", dir=parent))


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _finished(marker: Path, h: str) -> bool:
    from llmforge.prep.pipeline import marker_ok

    return marker_ok(marker, h)


def _mark(marker: Path, h: str) -> None:
    from llmforge.prep.pipeline import write_marker

    write_marker(marker, h)


def _exact_dropped(plan: DedupPlan, shard: int) -> np.ndarray:
    """Sorted keys of one shard's exact duplicates, from every exact partition (each sorted by key)."""
    if not plan.exact:
        return np.empty(0, dtype=np.int64)
    lo, hi = shard << 32, (shard + 1) << 32
    parts = []
    for t in range(plan.tasks):
        pairs = np.load(Path(plan.work) / "exact" / f"{t:05d}.npy", mmap_mode="r")
        a, b = np.searchsorted(pairs[:, 0], [lo, hi])
        parts.append(np.array(pairs[a:b, 0]))
    return np.sort(np.concatenate(parts))


def _partition(keys: np.ndarray, parts: int) -> np.ndarray:
    return (_fmix64(keys.astype(np.uint64)) % np.uint64(parts)).astype(np.int64)


def _gather(plan: DedupPlan, keys: np.ndarray) -> np.ndarray:
    """Full signatures of the documents with these keys, shape (len(keys), num_perm).

    Each shard's file is opened, read for the documents it holds, and unmapped again, so the task's
    resident memory stays bounded by what it returns (plus one shard's touched pages)."""
    shard_of = keys >> 32
    out = None
    index = {s: i for i, s in enumerate(plan.shards)}
    for s in np.unique(shard_of).tolist():
        rows = np.flatnonzero(shard_of == s)
        f = SignatureFile(plan.paths[index[s]])
        pos = np.searchsorted(f.doc, keys[rows] & _DOC_MASK)
        values = f.rows(pos)
        if out is None:
            out = np.empty((len(keys), plan.num_perm), dtype=values.dtype)
        out[rows] = values
        del f
    return out if out is not None else np.empty((0, plan.num_perm), dtype=np.uint32)


def _equal_counts(plan: DedupPlan, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Number of equal signature values of each pair (a[i], b[i]), in chunks of bounded memory."""
    itemsize = 8
    chunk = max(1024, plan.memory_bytes // (4 * plan.num_perm * itemsize))
    out = np.empty(len(a), dtype=np.int64)
    for s in range(0, len(a), chunk):
        sa, sb = _gather(plan, a[s : s + chunk]), _gather(plan, b[s : s + chunk])
        out[s : s + chunk] = np.count_nonzero(sa == sb, axis=1)
    return out


def _rss_mib() -> float:
    """This process's peak resident memory so far (MiB), for the tasks' stats."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------------
# The tasks


def exact_task(plan: DedupPlan, t: int) -> dict:
    """Exact duplicates among documents whose exact hash is in range t of T: (duplicate, representative)."""
    out = _dir(plan, "exact") / f"{t:05d}.npy"
    marker, h = out.with_suffix(".done"), plan.digest("exact", t)
    if _finished(marker, h):
        return json.loads(out.with_suffix(".json").read_text())
    start = time.perf_counter()
    lo, hi = _hash_range(t, plan.tasks)
    records = SortedRecords(_spill_dir(out.parent, f"runs{t:05d}"), plan.memory_bytes)
    for s, path in zip(plan.shards, plan.paths, strict=True):
        f = SignatureFile(path)
        ex = np.asarray(f.exact)
        sel = _in_range(ex, lo, hi)
        records.add(ex[sel], pack_keys(s, np.asarray(f.doc)[sel]))
        del f
    dups, reps = [], []
    for hs, ks in records.chunks():
        first = np.ones(len(hs), dtype=bool)
        first[1:] = hs[1:] != hs[:-1]
        head = np.maximum.accumulate(np.where(first, np.arange(len(hs)), 0))
        dups.append(ks[~first])
        reps.append(ks[head[~first]])
    shutil.rmtree(records.spill_dir, ignore_errors=True)
    dup = np.concatenate(dups) if dups else np.empty(0, np.int64)
    rep = np.concatenate(reps) if reps else np.empty(0, np.int64)
    order = np.argsort(dup)
    _save_npy(out, np.stack([dup[order], rep[order]], axis=1))
    stats = {
        "task": f"exact {t}",
        "duplicates": int(len(dup)),
        "spilled_bytes": records.spilled_bytes,
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": _rss_mib(),
    }
    out.with_suffix(".json").write_text(json.dumps(stats))
    _mark(marker, h)
    return stats


def _hash_range(r: int, parts: int) -> tuple[np.uint64, np.uint64 | None]:
    """Range r of `parts` equal ranges of the uint64 hashes: [lo, hi), hi None for the last."""
    lo = np.uint64((r << 64) // parts)
    return lo, (np.uint64(((r + 1) << 64) // parts) if r + 1 < parts else None)


def _in_range(h: np.ndarray, lo: np.uint64, hi: np.uint64 | None) -> np.ndarray:
    return h >= lo if hi is None else (h >= lo) & (h < hi)


def bucket_units(plan: DedupPlan) -> list[tuple[int, int]]:
    """(band, hash range) units of the bucket stage: every band, split into as many band-key ranges as it
    takes for every task to have one when there are more tasks than bands."""
    ranges = max(1, math.ceil(plan.tasks / plan.bands))
    return [(band, r) for band in range(plan.bands) for r in range(ranges)]


def bucket_task(plan: DedupPlan, t: int) -> dict:
    """Candidate pairs of the bucket units t, t + T, ...: one file per unit and verify partition."""
    out = _dir(plan, "candidates")
    stats = {"task": f"bucket {t}", "candidates": 0, "spilled_bytes": 0, "seconds": 0.0}
    units = bucket_units(plan)
    ranges = len(units) // plan.bands
    for band, r in units[t :: plan.tasks]:
        name = f"b{band:05d}.r{r:05d}"
        marker, h = out / f"{name}.done", plan.digest("bucket", band, r, ranges)
        if _finished(marker, h):
            continue
        start = time.perf_counter()
        records = SortedRecords(_spill_dir(out, f"runs.{name}"), plan.memory_bytes)
        lo_h, hi_h = _hash_range(r, ranges)
        lo = band * plan.rows
        for s, path in zip(plan.shards, plan.paths, strict=True):
            f = SignatureFile(path)
            keys = pack_keys(s, np.asarray(f.doc))
            bh = _band_hash(f.columns(lo, lo + plan.rows).T, band)
            del f
            keep = _in_range(bh, lo_h, hi_h)
            dropped = _exact_dropped(plan, s)
            if len(dropped):
                keep &= ~np.isin(keys, dropped, assume_unique=True)
            records.add(bh[keep], keys[keep])
        files = [open(out / f"{name}.v{v:05d}.bin.tmp", "wb") for v in range(plan.tasks)]
        try:
            for hs, ks in records.chunks():
                left, right = _window_pairs(hs, plan.window)
                a, b = ks[left], ks[right]
                part = _partition(a, plan.tasks)
                for v in range(plan.tasks):
                    sel = part == v
                    np.stack([a[sel], b[sel]], axis=1).tofile(files[v])
                stats["candidates"] += len(a)
        finally:
            for file in files:
                file.close()
        for v in range(plan.tasks):
            os.replace(out / f"{name}.v{v:05d}.bin.tmp", out / f"{name}.v{v:05d}.bin")
        shutil.rmtree(records.spill_dir, ignore_errors=True)
        stats["spilled_bytes"] = max(stats["spilled_bytes"], records.spilled_bytes)
        stats["seconds"] += time.perf_counter() - start
        _mark(marker, h)
    stats["peak_rss_mib"] = _rss_mib()
    return stats


def _candidate_passes(plan: DedupPlan, files: Sequence[Path]) -> int:
    """Passes over partition v's candidate files so that one pass's pairs fit half of ``memory_bytes``."""
    pairs = sum(f.stat().st_size for f in files) // 16
    return max(1, math.ceil(pairs / max(1024, plan.memory_bytes // (2 * PAIR_BYTES))))


def _candidates(plan: DedupPlan, files: Sequence[Path], j: int, passes: int) -> np.ndarray:
    """Pass j's candidate pairs of these files (those whose first key falls in sub-partition j),
    sorted and deduplicated across bands; the files are read in chunks, never whole."""
    chunk = max(1024, plan.memory_bytes // (4 * PAIR_BYTES))
    parts = []
    for path in files:
        mm = np.memmap(path, dtype=np.int64, mode="r") if path.stat().st_size else np.empty(0, np.int64)
        pairs = mm.reshape(-1, 2)
        for s in range(0, len(pairs), chunk):
            block = np.asarray(pairs[s : s + chunk])
            if passes > 1:  # independent of the partition (the hash's low part, modulo T)
                sub = (_fmix64(block[:, 0].astype(np.uint64)) // np.uint64(plan.tasks)) % np.uint64(passes)
                block = block[sub == j]
            parts.append(block)
        del mm, pairs
    pairs = np.concatenate(parts) if parts else np.empty((0, 2), np.int64)
    del parts
    if len(pairs):
        pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
        new = np.ones(len(pairs), dtype=bool)
        new[1:] = np.any(pairs[1:] != pairs[:-1], axis=1)
        pairs = pairs[new]
    return pairs


def verify_task(plan: DedupPlan, v: int) -> dict:
    """Partition v's candidate pairs, deduplicated across bands, kept where the estimated Jaccard passes.

    The partition's pairs are read in as many passes (sub-partitions by a hash of the first key) as it
    takes for one pass to fit ``memory_bytes``: memory stays bounded however many candidates there are."""
    out = _dir(plan, "verified") / f"{v:05d}.npy"
    marker, h = out.with_suffix(".done"), plan.digest("verify", v)
    if _finished(marker, h):
        return json.loads(out.with_suffix(".json").read_text())
    start = time.perf_counter()
    cand = Path(plan.work) / "candidates"
    files = [cand / f"b{b:05d}.r{r:05d}.v{v:05d}.bin" for b, r in bucket_units(plan)]
    passes = _candidate_passes(plan, files)
    kept, candidates = [], 0
    for j in range(passes):
        pairs = _candidates(plan, files, j, passes)
        candidates += len(pairs)
        equal = _equal_counts(plan, pairs[:, 0], pairs[:, 1])
        keep = equal >= plan.need
        kept.append(np.concatenate([pairs[keep], equal[keep, None]], axis=1))
        del pairs, equal, keep
    verified = np.concatenate(kept)
    verified = verified[np.lexsort((verified[:, 1], verified[:, 0]))]  # the same file for any pass count
    _save_npy(out, verified)
    stats = {
        "task": f"verify {v}",
        "candidate_pairs": int(candidates),
        "verified_pairs": int(len(verified)),
        "passes": passes,
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": _rss_mib(),
    }
    out.with_suffix(".json").write_text(json.dumps(stats))
    _mark(marker, h)
    return stats


def components_task(plan: DedupPlan) -> dict:
    """Connected components over the verified pairs; writes ``drop.npy`` and the audit ``removed.npz``."""
    work = Path(plan.work)
    marker, h = work / "components.done", plan.digest("components")
    if _finished(marker, h):
        return json.loads((work / "components.json").read_text())
    start = time.perf_counter()
    ex = [np.load(work / "exact" / f"{t:05d}.npy") for t in range(plan.tasks)] if plan.exact else []
    ex_pairs = np.concatenate(ex) if ex else np.empty((0, 2), np.int64)
    ver = [np.load(work / "verified" / f"{v:05d}.npy") for v in range(plan.tasks)] if plan.near else []
    verified = np.concatenate(ver) if ver else np.empty((0, 3), np.int64)
    nodes = np.unique(verified[:, :2])  # sorted keys: node ids in key order, so roots are smallest keys
    ia, ib = np.searchsorted(nodes, verified[:, 0]), np.searchsorted(nodes, verified[:, 1])
    root = _components(len(nodes), ia, ib)
    near = np.flatnonzero(root != np.arange(len(nodes)))
    near_drop, near_kept = nodes[near], nodes[root[near]]
    # exact duplicates follow their representative's cluster
    ex_drop, ex_rep = ex_pairs[:, 0], ex_pairs[:, 1]
    at = np.minimum(np.searchsorted(nodes, ex_rep), max(len(nodes) - 1, 0))
    in_cluster = (nodes[at] == ex_rep) if len(nodes) else np.zeros(len(ex_rep), dtype=bool)
    ex_kept = np.where(in_cluster, nodes[root[at]] if len(nodes) else ex_rep, ex_rep)
    drop = np.concatenate([ex_drop, near_drop])
    kept_for = np.concatenate([ex_kept, near_kept])
    is_exact = np.concatenate([np.ones(len(ex_drop), bool), np.zeros(len(near_drop), bool)])
    order = np.argsort(drop)
    drop, kept_for, is_exact = drop[order], kept_for[order], is_exact[order]
    # the audit trail: the similarity of each removed document to its survivor, estimated from signatures
    jaccard = np.ones(len(drop), dtype=np.float32)  # an exact duplicate kept for its own representative: 1
    direct = np.concatenate([ex_kept != ex_rep, np.ones(len(near_drop), bool)])[order]
    if direct.any():
        jaccard[direct] = _equal_counts(plan, drop[direct], kept_for[direct]) / plan.num_perm
    _save_npy(work / "drop.npy", drop)
    tmp = work / "removed.tmp.npz"
    np.savez(tmp, drop=drop, kept_for=kept_for, exact=is_exact, jaccard=jaccard)
    os.replace(tmp, work / "removed.npz")
    verify_stats = [
        json.loads((work / "verified" / f"{v:05d}.json").read_text()) for v in range(plan.tasks) if plan.near
    ]
    documents = sum(len(SignatureFile(p)) for p in plan.paths)
    stats = {
        "documents": documents,
        "exact_dropped": int(len(ex_drop)),
        "near_dropped": int(len(near_drop)),
        "candidate_pairs": sum(s["candidate_pairs"] for s in verify_stats),
        "verified_pairs": int(len(verified)),
        "clusters": int(len(np.unique(root[near]))),
        "bands": plan.bands,
        "rows": plan.rows,
        "threshold": plan.threshold,
        "verify_threshold": plan.verify_threshold,
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": _rss_mib(),
    }
    (work / "components.json").write_text(json.dumps(stats))
    _mark(marker, h)
    return stats


# ----------------------------------------------------------------------------------------------------------
# Driver


def _cached(stage: str):
    """The driver-side check of a finished task (the executor skips it without starting it)."""

    def done(plan: DedupPlan, t: int = 0) -> dict | None:
        work = Path(plan.work)
        if stage == "exact":
            marker, h = work / "exact" / f"{t:05d}.done", plan.digest("exact", t)
        elif stage == "verify":
            marker, h = work / "verified" / f"{t:05d}.done", plan.digest("verify", t)
        elif stage == "components":
            marker, h = work / "components.done", plan.digest("components")
        else:  # bucket: every unit of the task
            ranges = len(bucket_units(plan)) // plan.bands
            units = bucket_units(plan)[t :: plan.tasks]
            ok = all(
                _finished(
                    work / "candidates" / f"b{b:05d}.r{r:05d}.done", plan.digest("bucket", b, r, ranges)
                )
                for b, r in units
            )
            return {"task": f"bucket {t}", "cached": True, "peak_rss_mib": 0.0} if ok else None
        return json.loads(marker.with_suffix(".json").read_text()) if _finished(marker, h) else None

    return done


def run_dedup(plan: DedupPlan, executor) -> tuple[DedupResult, list[dict]]:
    """Run (or resume) every stage on `executor` (``map(fn, args, label, cached=...)``); the result and
    each task's stats (seconds, peak resident memory of its process, records spilled)."""
    tasks: list[dict] = []
    every = [(plan, t) for t in range(plan.tasks)]
    if plan.exact:
        tasks += executor.map(exact_task, every, label="dedup-exact", cached=_cached("exact"))
    if plan.near:
        tasks += executor.map(bucket_task, every, label="dedup-buckets", cached=_cached("bucket"))
        tasks += executor.map(verify_task, every, label="dedup-verify", cached=_cached("verify"))
    tasks += executor.map(components_task, [(plan,)], label="dedup-components", cached=_cached("components"))
    return load_result(plan), tasks


def load_result(plan: DedupPlan) -> DedupResult:
    work = Path(plan.work)
    stats = json.loads((work / "components.json").read_text())
    with np.load(work / "removed.npz") as z:
        drop, kept_for, exact = z["drop"], z["kept_for"], z["exact"]
    keep = ("documents", "exact_dropped", "near_dropped", "candidate_pairs", "verified_pairs", "clusters")
    return DedupResult(
        drop=drop,
        kept_for=kept_for,
        exact=exact,
        **{k: stats[k] for k in keep},
        bands=plan.bands,
        rows=plan.rows,
        threshold=plan.threshold,
        verify_threshold=plan.verify_threshold,
    )
