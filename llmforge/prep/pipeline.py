"""The data stage: crawl (or text) files -> clean, filtered, deduplicated, tokenized shards.

Stages, in order (per-shard stages run on the executor, one task per input shard):

1. ``process`` (per shard): read -> extract -> clean -> filters; writes the kept documents
   (``work/process/NNNNN.jsonl.gz``), their MinHash signatures and exact hashes (``.sig.npz``), step stats
   and a capped sample of dropped documents per reason.
2. ``dedup`` (tasks, `llmforge.prep.dedup_tasks`): exact and near duplicates across all shards from the
   memory-mapped signatures alone, as exact, bucket, verify and components tasks of bounded memory; writes
   the sorted keys of the documents to drop and, for each, its survivor and estimated Jaccard.
3. ``tokenizer`` (global): byte-level BPE on a deterministic, hash-selected sample of the kept documents.
4. ``tokenize`` (per shard): kept, non-duplicate documents -> token shards in the output directory, the
   split chosen by document hash.
5. ``finalize``: ``manifest.json`` (written last: a directory with a manifest is complete), ``stats.json``,
   ``report.md`` (the funnel) and ``dropped/`` (samples to read, per step and reason).

Every stage output is written to a temporary name and renamed; a ``.done`` marker written after it holds
the hash of the stage's config and of its inputs (file fingerprints and upstream markers). A rerun skips
tasks whose marker matches and redoes exactly those whose config or inputs changed, so a run killed at any
point finishes with the same bytes as an uninterrupted one, with any number of workers.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llmforge.data.shards import MANIFEST, TOKENIZER_FILE, SplitWriter, sha256_file, write_manifest
from llmforge.prep.document import Document
from llmforge.prep.step import PipelineStep, StepStats
from llmforge.prep.task import Meter

WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz", ".arc.gz")


# -- small utilities ------------------------------------------------------------------------------


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint(source: str | list[str]) -> Any:
    """What identifies an input's content cheaply: path, size and mtime for files; the URL otherwise."""
    if isinstance(source, list):
        return [fingerprint(s) for s in source]
    if source.startswith(("http://", "https://")) or source == "stdlib":
        return source
    st = os.stat(source)
    return {"path": os.path.abspath(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def marker_ok(path: Path, h: str) -> bool:
    try:
        return json.loads(path.read_text())["hash"] == h
    except (OSError, ValueError, KeyError):
        return False


def write_marker(path: Path, h: str) -> None:
    write_json(path, {"hash": h})


def doc_key(shard: int, index: int) -> int:
    return (shard << 32) | index


def hashed_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


# -- reading --------------------------------------------------------------------------------------


def source_documents(source: str | list[str], reader_cfg: dict, reader_stats: dict) -> Iterator[Document]:
    """Documents of one input shard: a crawl file, a JSON Lines file, a list of text files, or the embedded
    stdlib corpus."""
    from llmforge.prep.jsonl import JSONL_SUFFIXES, read_jsonl
    from llmforge.prep.readers import WarcReader, read_text_file
    from llmforge.prep.text import stdlib_documents

    if isinstance(source, str) and source.endswith(JSONL_SUFFIXES):
        text_field, id_field = reader_cfg.get("text_field", "text"), reader_cfg.get("id_field", "id")
        yield from read_jsonl(source, text_field, id_field, reader_stats)
        return
    if source == "stdlib":
        for doc_id, text in stdlib_documents():
            yield Document(text, doc_id, {"source": "stdlib", "content_type": "text/plain"})
        return
    if isinstance(source, list):
        for path in source:
            yield from read_text_file(path)
        return
    reader = WarcReader(max_record_bytes=int(reader_cfg.get("max_record_bytes", 10 << 20)))
    try:
        yield from reader.read(source)
    finally:
        reader_stats.update(reader.stats.as_dict())


def build_steps(cfg: dict) -> list[PipelineStep]:
    from llmforge.prep.clean import Clean
    from llmforge.prep.extract import Extract
    from llmforge.prep.filters import build_filters

    steps: list[PipelineStep] = []
    extract = dict(cfg.get("extract") or {})
    if extract.pop("enabled", True):
        steps.append(Extract(**extract))
    clean = dict(cfg.get("clean") or {})
    if clean.pop("enabled", True):
        steps.append(Clean(**clean))
    steps.extend(build_filters(dict(cfg.get("filters") or {})))
    return steps


def make_hasher(dedup_cfg: dict):
    from llmforge.prep.dedup import MinHasher

    return MinHasher(
        num_perm=int(dedup_cfg.get("num_perm", 128)),
        ngram=int(dedup_cfg.get("ngram", 3)),
        seed=int(dedup_cfg.get("seed", 1)),
    )


def read_kept(work: Path, index: int) -> Iterator[Document]:
    with gzip.open(work / "process" / f"{index:05d}.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            yield Document.from_json(json.loads(line))


# -- stage 1: process (per shard) -----------------------------------------------------------------


def process_hash(cfg: dict, source: str | list[str]) -> str:
    keys = ("reader", "extract", "clean", "filters")
    dedup = {k: cfg["dedup"].get(k) for k in ("num_perm", "ngram", "seed")}
    dedup["signature_format"] = 2  # 2: memory-mappable, transposed (dedup.write_signatures)
    return digest({k: cfg.get(k) for k in keys}, dedup, fingerprint(source))


def process_cached(cfg: dict, work_dir: str, index: int, source: str | list[str]) -> dict | None:
    """The shard's stats if its process output is done for this config and input, else None."""
    out = Path(work_dir) / "process"
    if marker_ok(out / f"{index:05d}.done", process_hash(cfg, source)):
        return json.loads((out / f"{index:05d}.stats.json").read_text())
    return None


def documents_read(stats: dict) -> int:
    """Documents that entered a shard's steps (for documents/s)."""
    return stats["steps"][0]["docs_in"] if stats["steps"] else stats["kept"]


def process_shard(cfg: dict, work_dir: str, index: int, source: str | list[str]) -> dict:
    from llmforge.prep.readers import download

    if (done := process_cached(cfg, work_dir, index, source)) is not None:
        return done
    work = Path(work_dir)
    out = work / "process"
    h = process_hash(cfg, source)
    stats_path = out / f"{index:05d}.stats.json"
    start, cpu_start = time.perf_counter(), time.process_time()
    downloaded = isinstance(source, str) and source.startswith(("http://", "https://"))
    if downloaded:
        local = str(download(source, work / "downloads" / f"{index:05d}-{Path(source).name}"))
    else:
        local = source
    reader_stats: dict = {}
    steps = build_steps(cfg)
    counter = Meter(f"process {index:05d}", unit="docs")
    stream: Iterable[Document] = source_documents(local, cfg.get("reader") or {}, reader_stats)
    stream = counter.counted(stream)
    for step in steps:
        stream = step.run(stream, rank=index)
    from llmforge.prep.dedup import write_signatures

    hasher = make_hasher(cfg["dedup"])
    docs_path = out / f"{index:05d}.jsonl.gz"
    tmp = docs_path.with_name(docs_path.name + ".tmp")
    out.mkdir(parents=True, exist_ok=True)
    exact: list[np.ndarray] = []
    sigs: list[np.ndarray] = []

    def sign(texts: list[str]) -> None:
        exact_hashes, signatures = hasher.fingerprints(texts)
        exact.append(exact_hashes)
        sigs.append(signatures)

    n = 0
    # level 1: intermediate files, read once by the later stages; ~30% less CPU than level 3, 9% larger
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
        batch: list[str] = []
        for doc in stream:
            gz.write((json.dumps(doc.to_json(), ensure_ascii=False, sort_keys=True) + "\n").encode())
            batch.append(doc.text)
            n += 1
            if len(batch) == 512:
                sign(batch)
                batch = []
        sign(batch)  # the last batch, maybe empty (typed empty arrays)
    os.replace(tmp, docs_path)
    write_signatures(
        out / f"{index:05d}.sig.npz",
        np.arange(n, dtype=np.int64),
        np.concatenate(exact),
        np.concatenate(sigs),
        hasher.config(),
    )
    stats = {
        "shard": index,
        "source": source if isinstance(source, str) else f"{len(source)} text files",
        "reader": reader_stats,
        "steps": [s.stats.as_dict() for s in steps],
        "kept": n,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,  # this process, all its threads
    }
    counter.close()
    write_json(out / f"{index:05d}.dropped.json", {s.name: s.stats.samples for s in steps})
    write_json(stats_path, stats)
    write_marker(out / f"{index:05d}.done", h)
    if downloaded and not cfg.get("keep_downloads", False):  # the shard's outputs hold what later stages need
        Path(local).unlink(missing_ok=True)
    return stats


# -- stage 2: dedup (tasks on the executor) ------------------------------------------------------

# settings that change how the work is split, never the result: left out of the stage's hash
DEDUP_SPLIT_KEYS = ("tasks", "memory_gb")


def dedup_tasks(d: dict, executor, docs: int, num_perm: int) -> int:
    """`dedup.tasks`, or by default one task per ~256 MiB of signatures: at most the local executor's
    workers (processes on this machine); on a cluster (SLURM, Ray) as many as that makes."""
    if d.get("tasks"):
        return int(d["tasks"])
    tasks = math.ceil(docs * num_perm * 4 / (256 << 20))
    workers = getattr(executor, "workers", None)  # only the local executor has a fixed number of workers
    return max(1, min(tasks, int(workers)) if workers else tasks)


def dedup_stage(cfg: dict, work_dir: str, n_shards: int, executor) -> dict:
    """Exact and near duplicates across all shards, as bounded-memory tasks (`llmforge.prep.dedup_tasks`)
    run on the executor; writes ``dedup/drop.npy`` (sorted keys to drop) and the audit trail
    ``dedup/removed.npz`` (each removed document's survivor and estimated Jaccard)."""
    from llmforge.prep.dedup import SignatureFile
    from llmforge.prep.dedup_tasks import make_plan, run_dedup

    work = Path(work_dir)
    d = cfg["dedup"]
    upstream = [json.loads((work / "process" / f"{i:05d}.done").read_text())["hash"] for i in range(n_shards)]
    h = digest({k: v for k, v in d.items() if k not in DEDUP_SPLIT_KEYS}, upstream)
    out = work / "dedup"
    if marker_ok(out / "dedup.done", h):
        return json.loads((out / "stats.json").read_text())
    start = time.perf_counter()
    paths = [work / "process" / f"{i:05d}.sig.npz" for i in range(n_shards)]
    docs = sum(len(SignatureFile(p)) for p in paths)
    plan = make_plan(
        out,
        paths,
        threshold=float(d.get("threshold", 0.7)),
        bands=d.get("bands"),
        rows=d.get("rows"),
        tasks=dedup_tasks(d, executor, docs, int(d.get("num_perm", 128))),
        memory_gb=float(d.get("memory_gb", 1.0)),
        exact=bool(d.get("exact", True)),
        near=bool(d.get("near", True)),
        inputs=digest(upstream),
    )
    result, tasks = run_dedup(plan, executor)
    stats = {
        "docs_in": docs,
        "docs_out": docs - len(result.drop),
        "seconds": time.perf_counter() - start,
        "tasks": plan.tasks,
        "task_peak_rss_mib": max(t["peak_rss_mib"] for t in tasks),
        **result.stats(),
    }
    write_json(out / "stats.json", stats)
    write_marker(out / "dedup.done", h)
    return stats


def load_drop(work: Path) -> np.ndarray:
    return np.load(work / "dedup" / "drop.npy")


def kept_documents(work: Path, index: int, drop: np.ndarray) -> Iterator[Document]:
    lo, hi = np.searchsorted(drop, [doc_key(index, 0), doc_key(index + 1, 0)])
    dropped = set((drop[lo:hi] & 0xFFFFFFFF).tolist())
    for i, doc in enumerate(read_kept(work, index)):
        if i not in dropped:
            yield doc


# -- stage 3: tokenizer (global) ------------------------------------------------------------------


def tokenizer_hash(cfg: dict, work: Path) -> str:
    if (cfg["tokenizer"] or {}).get("path"):  # reused: its bytes are the stage's only input
        return digest("reuse", sha256_file(reused_tokenizer(cfg["tokenizer"]["path"])))
    return digest(cfg["tokenizer"], json.loads((work / "dedup" / "dedup.done").read_text())["hash"])


def tokenizer_cached(cfg: dict, work_dir: str, n_shards: int) -> str | None:
    work = Path(work_dir)
    done = marker_ok(work / "tokenizer" / "tokenizer.done", tokenizer_hash(cfg, work))
    return str(work / "tokenizer" / TOKENIZER_FILE) if done else None


def tokenizer_stage(cfg: dict, work_dir: str, n_shards: int) -> str:
    from llmforge.prep.tokenizer import train_bpe

    if (done := tokenizer_cached(cfg, work_dir, n_shards)) is not None:
        return done
    work = Path(work_dir)
    t = cfg["tokenizer"]
    h = tokenizer_hash(cfg, work)
    out = work / "tokenizer"
    path = out / TOKENIZER_FILE
    if t.get("path"):  # reuse a tokenizer (a mixture's sources share one): its bytes, checked, no training
        write_atomic(path, reused_tokenizer(t["path"]).read_bytes())
        write_marker(out / "tokenizer.done", h)
        return str(path)
    drop = load_drop(work)
    fraction, budget = float(t.get("sample_fraction", 1.0)), int(t.get("sample_chars", 200_000_000))
    stats = [work / "process" / f"{i:05d}.stats.json" for i in range(n_shards)]
    kept = sum(json.loads(p.read_text())["kept"] for p in stats)
    progress = Meter("tokenizer: sample", total=kept - drop.size, unit="docs")

    def sample() -> Iterator[str]:
        used = 0
        for i in range(n_shards):
            for doc in progress.counted(kept_documents(work, i, drop)):
                if used >= budget:
                    return
                if fraction >= 1.0 or hashed_fraction(doc.id) < fraction:
                    used += len(doc.text)
                    yield doc.text

    tok = train_bpe(
        sample(), int(t["vocab_size"]), int(t.get("num_sentinels", 100)), int(t.get("min_frequency", 2))
    )
    progress.close()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.tmp.json"
    tok.save(str(tmp))
    os.replace(tmp, path)
    write_marker(out / "tokenizer.done", h)
    return str(path)


def reused_tokenizer(spec: str) -> Path:
    """``tokenizer.path``: a tokenizer.json, or a directory holding one (a prepared dataset's); checked to
    load and to have llmforge's special tokens."""
    from tokenizers import Tokenizer

    from llmforge.prep.tokenizer import special_token_ids

    path = Path(spec)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.path={spec}: no tokenizer file there ({path} missing)")
    try:
        special_token_ids(Tokenizer.from_file(str(path)))
    except Exception as err:  # noqa: BLE001 - any load failure is one line naming the key
        raise ValueError(f"tokenizer.path={spec}: not a usable tokenizer ({err})") from None
    return path


def origin(doc: Document) -> dict:
    """Where a document came from, for the lineage index (`llmforge.data.lineage`): its id (WARC record id,
    file path or JSON id), URL, input file and line, whichever are known."""
    meta = doc.metadata
    out = {"id": doc.id, "url": meta.get("url"), "file": meta.get("source"), "line": meta.get("line")}
    return {k: v for k, v in out.items() if v is not None}


# -- stage 4: tokenize (per shard) ----------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def load_tokenizer(path: str, mtime_ns: int):
    """One tokenizer load per worker process and file version, not one per shard."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def tokenize_hash(cfg: dict, work: Path, index: int) -> str:
    upstream = [
        json.loads((work / p).read_text())["hash"]
        for p in (f"process/{index:05d}.done", "dedup/dedup.done", "tokenizer/tokenizer.done")
    ]
    return digest({k: cfg.get(k) for k in ("val_fraction", "shard_tokens")}, upstream, {"lineage": 1})


def tokenize_cached(cfg: dict, work_dir: str, out_dir: str, index: int) -> dict | None:
    work = Path(work_dir)
    if marker_ok(work / "tokenize" / f"{index:05d}.done", tokenize_hash(cfg, work, index)):
        return json.loads((work / "tokenize" / f"{index:05d}.json").read_text())
    return None


def tokenize_shard(cfg: dict, work_dir: str, out_dir: str, index: int) -> dict:
    from llmforge.prep.tokenizer import special_token_ids
    from llmforge.prep.writers import encode_into

    if (done := tokenize_cached(cfg, work_dir, out_dir, index)) is not None:
        return done
    work, out = Path(work_dir), Path(out_dir)
    tok_path = work / "tokenizer" / TOKENIZER_FILE
    h = tokenize_hash(cfg, work, index)
    summary_path = work / "tokenize" / f"{index:05d}.json"
    start, cpu_start = time.perf_counter(), time.process_time()
    tok = load_tokenizer(str(tok_path), tok_path.stat().st_mtime_ns)
    specials = special_token_ids(tok)
    vocab = tok.get_vocab_size()
    out.mkdir(parents=True, exist_ok=True)
    writers = {
        split: SplitWriter(
            out, split, vocab, specials["eos"], int(cfg["shard_tokens"]), stem=f"{split}-{index:05d}"
        )
        for split in ("train", "val")
    }
    counter = Meter(f"tokenize {index:05d}", unit="docs")
    kept = counter.counted(kept_documents(work, index, load_drop(work)))
    docs = ((d.id, d.text, origin(d)) for d in kept)
    count = encode_into(writers, docs, tok, float(cfg["val_fraction"]))
    counter.close()
    summary = {split: w.summary() for split, w in writers.items()}
    summary["seconds"] = time.perf_counter() - start
    summary["cpu_seconds"] = time.process_time() - cpu_start
    summary["documents_in"] = count
    write_json(summary_path, summary)
    write_marker(work / "tokenize" / f"{index:05d}.done", h)
    return summary


# -- stage 5: finalize ------------------------------------------------------------------------------


def funnel_report(process_stats: list[dict], dedup: dict, tokenize: list[dict]) -> tuple[dict, str]:
    """Run-level totals per step and reason, and the markdown funnel."""
    reader_totals: dict[str, Any] = {"records": 0, "documents": 0, "bytes_read": 0, "skipped": {}}
    steps: dict[str, StepStats] = {}
    for s in process_stats:
        r = s.get("reader") or {}
        for key in ("records", "documents", "bytes_read"):
            reader_totals[key] += r.get(key, 0)
        for reason, count in (r.get("skipped") or {}).items():
            reader_totals["skipped"][reason] = reader_totals["skipped"].get(reason, 0) + count
        for st in s["steps"]:
            steps.setdefault(st["name"], StepStats(st["name"])).merge(st)
    tokens = {split: sum(t[split]["tokens"] for t in tokenize) for split in ("train", "val")}
    docs = {split: sum(t[split]["documents"] for t in tokenize) for split in ("train", "val")}
    first = next(iter(steps.values())).docs_in if steps else sum(s["kept"] for s in process_stats)
    lines = [
        "# Data-stage funnel",
        "",
        f"Read {reader_totals['records']} records "
        f"({reader_totals['bytes_read'] / 1e6:.1f} MB), {first} documents entered the steps.",
        "",
        "| step | docs in | docs out | kept of input | seconds | docs/s | dropped (reason: count) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]

    def row(name: str, d_in: int, d_out: int, secs: float, dropped: dict) -> str:
        pct = f"{100 * d_out / first:.1f}%" if first else "-"
        rate = f"{d_in / secs:.0f}" if secs > 0 else "-"
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1]))
        return f"| {name} | {d_in} | {d_out} | {pct} | {secs:.2f} | {rate} | {reasons} |"

    lines.append(row("read", reader_totals["records"], first, 0.0, reader_totals["skipped"]))
    for st in steps.values():
        lines.append(row(st.name, st.docs_in, st.docs_out, st.seconds, dict(st.dropped)))
    dedup_dropped = {k: dedup.get(k, 0) for k in ("exact_dropped", "near_dropped")}
    lines.append(
        row(
            "dedup",
            dedup.get("docs_in", 0),
            dedup.get("docs_out", 0),
            dedup.get("seconds", 0.0),
            dedup_dropped,
        )
    )
    tok_secs = sum(t["seconds"] for t in tokenize)
    lines.append(
        row("tokenize", sum(t["documents_in"] for t in tokenize), docs["train"] + docs["val"], tok_secs, {})
    )
    for st in steps.values():
        if st.counters:
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(st.counters.items(), key=lambda kv: -kv[1]))
            lines += ["", f"{st.name} counts: {counts}"]
    lines += [
        "",
        f"Tokens: train {tokens['train']:,}, val {tokens['val']:,}; documents: train {docs['train']:,}, "
        f"val {docs['val']:,}.",
        "",
        "Samples of dropped documents: `dropped/<step>/<reason>.jsonl`.",
        "",
    ]
    totals = {
        "reader": reader_totals,
        "steps": {k: v.as_dict() for k, v in steps.items()},
        "dedup": dedup,
        "tokens": tokens,
        "documents": docs,
    }
    return totals, "\n".join(lines)


def dedup_samples(work: Path, cap: int, excerpt_chars: int = 2000) -> dict[str, list[dict]]:
    """Up to `cap` removed documents per reason (``exact_dropped``, ``near_dropped``, as the stage counts
    them), smallest keys first, each with its survivor and their estimated Jaccard (from the audit trail
    ``dedup/removed.npz``)."""
    with np.load(work / "dedup" / "removed.npz") as z:
        drop, kept, exact, jac = z["drop"], z["kept_for"], z["exact"], z["jaccard"]
    chosen = {
        reason: np.flatnonzero(exact if reason == "exact_dropped" else ~exact)[:cap]
        for reason in ("exact_dropped", "near_dropped")
    }
    wanted = {int(k) for rows in chosen.values() for k in (*drop[rows].tolist(), *kept[rows].tolist())}
    docs: dict[int, Document] = {}
    for shard in sorted({k >> 32 for k in wanted}):
        for i, doc in enumerate(read_kept(work, shard)):
            if doc_key(shard, i) in wanted:
                docs[doc_key(shard, i)] = doc
    samples = {}
    for reason, rows in chosen.items():
        if len(rows):
            samples[reason] = [
                {
                    "id": docs[int(drop[r])].id,
                    "url": docs[int(drop[r])].metadata.get("url"),
                    "survivor_id": docs[int(kept[r])].id,
                    "survivor_url": docs[int(kept[r])].metadata.get("url"),
                    "jaccard": round(float(jac[r]), 4),
                    "text": docs[int(drop[r])].text[:excerpt_chars],
                }
                for r in rows.tolist()
            ]
    return samples


def write_dropped_samples(work: Path, out: Path, n_shards: int, cap: int) -> None:
    """`dropped/<step>/<reason>.jsonl` for this run's reasons; files of reasons that no longer occur go."""
    merged: dict[str, dict[str, list]] = {}
    for i in range(n_shards):
        for step, reasons in json.loads((work / "process" / f"{i:05d}.dropped.json").read_text()).items():
            for reason, samples in reasons.items():
                bucket = merged.setdefault(step, {}).setdefault(reason, [])
                bucket.extend(samples[: max(0, cap - len(bucket))])
    if (work / "dedup" / "removed.npz").exists():  # the dedup stage's audit trail
        merged["dedup"] = dedup_samples(work, cap)
    written: set[Path] = set()
    for step, reasons in merged.items():
        for reason, samples in reasons.items():
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in reason)
            body = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
            write_atomic(out / "dropped" / step / f"{safe}.jsonl", body.encode())
            written.add(out / "dropped" / step / f"{safe}.jsonl")
    for stale in set((out / "dropped").glob("*/*.jsonl")) - written:
        stale.unlink()
    for folder in (out / "dropped").glob("*"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def result_config(cfg: dict) -> dict:
    """The settings that can change the dataset's bytes (not where it goes, nor how the work is split)."""
    d = {k: v for k, v in cfg["dedup"].items() if k not in DEDUP_SPLIT_KEYS}
    return {k: v for k, v in cfg.items() if k != "output_dir"} | {"dedup": d}


def finalize(
    cfg: dict,
    work: Path,
    out: Path,
    process_stats: list[dict],
    dedup: dict,
    tokenize: list[dict],
    sources: list,
) -> dict:
    tok_src = work / "tokenizer" / TOKENIZER_FILE
    write_atomic(out / TOKENIZER_FILE, tok_src.read_bytes())
    from tokenizers import Tokenizer

    from llmforge.prep.tokenizer import special_token_ids

    tok = Tokenizer.from_file(str(tok_src))
    splits = {}
    for split in ("train", "val"):
        shards = [s for t in tokenize for s in t[split]["shards"]]
        splits[split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "shards": shards,
        }
    listed = {s["file"] for sp in splits.values() for s in sp["shards"]}
    for stale in list(out.glob("*.bin")) + list(out.glob("*.idx")) + list(out.glob("*.docs.jsonl")):
        stem = stale.name.removesuffix(".docs.jsonl").removesuffix(".idx").removesuffix(".bin")
        if stem + ".bin" not in listed:
            stale.unlink()
    totals, report = funnel_report(process_stats, dedup, tokenize)
    write_dropped_samples(work, out, len(sources), int(cfg.get("dropped_samples", 50)))
    write_json(out / "stats.json", {"shards": process_stats, "totals": totals})
    write_atomic(out / "report.md", report.encode())
    source = {
        "inputs": len(sources),
        "funnel": {
            name: {"in": v["docs_in"], "out": v["docs_out"], "dropped": v["dropped"]}
            for name, v in totals["steps"].items()
        },
        "dedup": {k: dedup.get(k) for k in ("docs_in", "docs_out", "exact_dropped", "near_dropped")},
        "reader": {k: totals["reader"][k] for k in ("records", "documents", "skipped")},
        "decontaminated_against": decontaminated_against(cfg),
    }
    if (cfg.get("tokenizer") or {}).get("path"):  # reused, not trained here
        source["tokenizer"] = {"reused": str(Path(cfg["tokenizer"]["path"]).resolve())}
    return write_manifest(
        out,
        vocab_size=tok.get_vocab_size(),
        special_tokens=special_token_ids(tok),
        tokenizer_sha256=sha256_file(out / TOKENIZER_FILE),
        splits=splits,
        source=source,
        config_hash=digest(result_config(cfg)),
    )


def decontaminated_against(cfg: dict) -> list[str]:
    section = (cfg.get("filters") or {}).get("decontaminate") or {}
    return list(section.get("tasks") or []) if section.get("enabled", False) else []


# -- the driver -----------------------------------------------------------------------------------


def plan_sources(inputs: list[str], files_per_shard: int) -> list[str | list[str]]:
    """Crawl and JSON Lines files are one shard each; plain text files are grouped `files_per_shard` to a
    shard."""
    from llmforge.prep.jsonl import JSONL_SUFFIXES

    crawl = [s for s in inputs if s == "stdlib" or s.endswith(WARC_SUFFIXES + JSONL_SUFFIXES)]
    text = [s for s in inputs if s not in crawl]
    groups = [text[i : i + files_per_shard] for i in range(0, len(text), files_per_shard)]
    return [*crawl, *groups]


def check_survivors(process_stats: list[dict]) -> None:
    """ValueError (one line: the step that dropped the most) when no document came through the steps."""
    if sum(s["kept"] for s in process_stats):
        return
    drops: dict[str, Counter] = {"read": Counter()}
    for s in process_stats:
        drops["read"].update((s.get("reader") or {}).get("skipped") or {})
        for st in s["steps"]:
            drops.setdefault(st["name"], Counter()).update(st["dropped"])
    step, reasons = max(drops.items(), key=lambda kv: kv[1].total())
    if not reasons:
        raise ValueError(f"no document survived: the {len(process_stats)} input(s) held no record to read")
    top = ", ".join(f"{r}: {c}" for r, c in reasons.most_common(3))
    raise ValueError(f"no document survived: step {step!r} dropped the most ({reasons.total()}: {top})")


def run_pipeline(cfg: dict, inputs: list[str], out_dir: Path, executor) -> dict:
    """Runs (or resumes) every stage; returns the manifest."""
    out = Path(out_dir)
    work = out / "work"
    sources = plan_sources(inputs, int(cfg.get("files_per_shard", 1000)))
    if not sources:
        raise ValueError("no input to process")
    if (out / MANIFEST).exists():
        (out / MANIFEST).unlink()  # the manifest marks a complete dataset: remove it while we change it
    n = len(sources)
    from llmforge.prep.decontaminate import prepare_index

    cfg = prepare_index(cfg, work)
    process_stats = executor.map(
        process_shard,
        [(cfg, str(work), i, s) for i, s in enumerate(sources)],
        label="process",
        cached=process_cached,
        count=documents_read,
    )
    check_survivors(process_stats)
    dedup = dedup_stage(cfg, str(work), n, executor)
    executor.run(tokenizer_stage, cfg, str(work), n, label="tokenizer", cached=tokenizer_cached)
    tokenize = executor.map(
        tokenize_shard,
        [(cfg, str(work), str(out), i) for i in range(n)],
        label="tokenize",
        cached=tokenize_cached,
        count=lambda summary: summary["documents_in"],
    )
    return finalize(cfg, work, out, process_stats, dedup, tokenize, sources)
