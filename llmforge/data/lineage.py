"""Lineage: from a training step to the documents its windows hold.

The data stage writes, beside each token shard, ``{split}-NNNNN.docs.jsonl``: line i is where document i of
the shard came from (``id``: WARC record id, file path or JSON id; ``url``, ``file``, ``line`` when known).
A run writes ``data_log.jsonl`` in its directory each time training starts or resumes: the step, the global
cursor, the world size, per-device batch, gradient accumulation and (mixtures) the schedule's segments.
From these, `step_windows` recomputes which windows every rank trained on at any step (the samplers are
pure functions of the cursor), and `Lineage.describe` names each window's documents: source, ordinal,
origin and a short excerpt of the part of the document inside the window.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np

from llmforge.data.dataset import PackedWindows
from llmforge.data.shards import LINEAGE_SUFFIX, TOKENIZER_FILE, ShardSet

DATA_LOG = "data_log.jsonl"


@dataclass
class SourceLineage:
    """Document boundaries and origins of one split of one dataset directory."""

    name: str
    shards: ShardSet
    seq_len: int

    @cached_property
    def doc_ends(self) -> np.ndarray:
        """End offsets of every document in the split's token stream (shards concatenated)."""
        starts = np.cumsum([0] + [a.size for a in self.shards.arrays])
        return np.concatenate([e + s for e, s in zip(self.shards.doc_ends, starts, strict=False)] or [[]])

    @cached_property
    def first_doc(self) -> np.ndarray:
        return np.cumsum([0] + [e.size for e in self.shards.doc_ends])

    @cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer

        path = self.shards.directory / TOKENIZER_FILE
        return Tokenizer.from_file(str(path)) if path.is_file() else None

    def origins(self, shard: int) -> list[dict]:
        cache = self.__dict__.setdefault("_origins", {})
        if shard not in cache:
            file = self.shards.manifest["splits"][self.shards.split]["shards"][shard]["file"]
            path = self.shards.directory / file.replace(".bin", LINEAGE_SUFFIX)
            cache[shard] = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
        return cache[shard]

    def origin(self, ordinal: int) -> dict:
        shard = int(np.searchsorted(self.first_doc, ordinal, side="right")) - 1
        local = ordinal - int(self.first_doc[shard])
        found = self.origins(shard)
        return dict(found[local]) if local < len(found) else {}

    def window_documents(self, window: int, excerpt_chars: int = 120) -> list[dict]:
        """The documents window ``window`` (of ``seq_len``) overlaps, each with its origin, its token
        range inside the window and an excerpt of that part's text."""
        packed = PackedWindows(self.shards, self.seq_len)
        start, end = packed.span(window)
        ends = self.doc_ends
        out = []
        d = int(np.searchsorted(ends, start, side="right"))  # the first document ending after start
        while d < ends.size:
            doc_start = int(ends[d - 1]) if d else 0
            if doc_start >= end:
                break
            lo, hi = max(start, doc_start), min(end, int(ends[d]))
            entry = {"ordinal": d, **self.origin(d), "tokens": [lo - start, hi - start]}
            if excerpt_chars and self.tokenizer is not None:
                ids = packed.read(lo, hi)[: hi - lo].tolist()
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                entry["excerpt"] = " ".join(text.split())[:excerpt_chars]
            out.append(entry)
            d += 1
        return out


class Lineage:
    """Flat window indices of a run (single dataset, or a mixture's concatenated sources) -> documents."""

    def __init__(self, sources: list[tuple[str, str | Path]], seq_len: int, split: str = "train") -> None:
        self.sources = [SourceLineage(name, ShardSet.open(path, split), seq_len) for name, path in sources]
        sizes = [len(PackedWindows(s.shards, seq_len)) for s in self.sources]
        self.bases = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @classmethod
    def of_datamodule(cls, dm) -> Lineage:
        if dm.sources:
            return cls([(s.name, s.path) for s in dm.sources], dm.seq_len)
        return cls([(dm.path.name, dm.path)], dm.seq_len)

    def describe(self, index: int, excerpt_chars: int = 120) -> dict:
        s = int(np.searchsorted(self.bases, index, side="right")) - 1
        window = int(index - self.bases[s])
        source = self.sources[s]
        return {
            "index": int(index),
            "source": source.name,
            "window": window,
            "documents": source.window_documents(window, excerpt_chars),
        }


# -- which windows a step trained on ---------------------------------------------------------------------


class DataLog(L.Callback):
    """Appends the data position and world of each (re)start to ``RUN_DIR/data_log.jsonl`` (rank 0)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def on_train_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        entry = {
            "step": trainer.global_step,
            "cursor": dm.cursor(),
            "world_size": trainer.world_size,
            "batch_size": dm.batch_size,
            "accumulate": trainer.accumulate_grad_batches,
            "segments": [seg.to_dict() for seg in dm.segments],
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / DATA_LOG, "a") as f:
            f.write(json.dumps(entry) + "\n")


def phase_at(run_dir: str | Path, step: int) -> dict:
    """The data-log entry in force at ``step``: the last (re)start at or before it (a later restart from an
    earlier checkpoint replaces what followed that checkpoint)."""
    path = Path(run_dir) / DATA_LOG
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: the run predates lineage logging or never started training")
    entries = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    live: list[dict] = []
    for e in entries:
        live = [p for p in live if p["step"] < e["step"]] + [e]
    before = [p for p in live if p["step"] <= step]
    if not before:
        raise ValueError(f"step {step} precedes the first logged start (step {live[0]['step']})")
    return before[-1]


def step_windows(dm, phase: dict, step: int) -> list[list[int]]:
    """Per rank, the flat window indices of optimizer step ``step`` (all micro-batches, in order), as the
    samplers of ``dm`` (a `ShardDataModule` built from the run's config) draw them in ``phase``."""
    from llmforge.data.mixture import MixtureSampler, Segment

    world, batch, accumulate = phase["world_size"], phase["batch_size"], phase["accumulate"]
    cursor = phase["cursor"] + (step - phase["step"]) * batch * world * accumulate
    if dm.sources:
        segments = [Segment.from_dict(d) for d in phase["segments"]] or None
        sampler = MixtureSampler(
            [len(s.train) for s in dm.sources],
            [s.weight for s in dm.sources],
            batch,
            seed=dm.seed,
            shuffle=dm.shuffle,
            names=dm.source_names,
            segments=segments,
        )
    else:
        sampler = dm.sampler()
    out = []
    for rank in range(world):
        positions = [cursor + a * batch * world + rank * batch + np.arange(batch) for a in range(accumulate)]
        out.append(sampler.orders(np.concatenate(positions)).tolist())
    return out


def run_datamodule(run_dir: str | Path):
    """The `ShardDataModule` of a run, from its ``config.yaml`` (no collate: for looking up windows only)."""
    from omegaconf import OmegaConf

    from llmforge.data.datamodule import ShardDataModule

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: not a run directory")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)["data"]
    return ShardDataModule(
        path=data.get("path"),
        seq_len=data["seq_len"],
        batch_size=data["batch_size"],
        collate_fn=None,
        seed=data["seed"],
        shuffle=data.get("shuffle", True),
        sources=data.get("sources") or None,
        alpha=data.get("alpha"),
    )


def inspect_step(
    run_dir: str | Path, step: int, sample: int | None = None, excerpt_chars: int = 120
) -> list[dict]:
    """Per rank, the windows of optimizer step ``step`` described by `Lineage.describe` (``sample``: only
    the step's I-th window of each rank, counting all micro-batches)."""
    dm = run_datamodule(run_dir)
    phase = phase_at(run_dir, step)
    lineage = Lineage.of_datamodule(dm)
    out = []
    for rank, indices in enumerate(step_windows(dm, phase, step)):
        picked = list(enumerate(indices)) if sample is None else [(sample, indices[sample])]
        for i, index in picked:
            out.append({"step": step, "rank": rank, "sample": i, **lineage.describe(index, excerpt_chars)})
    return out


def describe_indices(datamodule, indices: list[int], excerpt_chars: int = 0) -> list[dict]:
    """`Lineage.describe` for the windows of a running datamodule (the stability guard names the documents
    of a spiking batch with it); an index it cannot describe gets an ``error`` entry instead."""
    lineage = getattr(datamodule, "_lineage", None)
    if lineage is None:
        lineage = Lineage.of_datamodule(datamodule)
        datamodule._lineage = lineage
    out = []
    for index in indices:
        try:
            out.append(lineage.describe(int(index), excerpt_chars))
        except (OSError, ValueError, IndexError, KeyError) as err:
            out.append({"index": int(index), "error": str(err)})
    return out
