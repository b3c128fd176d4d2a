"""The step contract of the data stage.

Every step is ``run(documents, rank, world_size) -> documents``, a generator. It counts what goes in and
out, and what it drops *per reason*; a filter also keeps a capped sample of what it dropped, per reason, so
a threshold can be judged by reading (house rules 4 and 5). Steps are cheap to construct and picklable, so
an executor can ship them to worker processes.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from llmforge.prep.document import Document


@dataclass
class StepStats:
    name: str
    docs_in: int = 0
    docs_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    seconds: float = 0.0
    dropped: Counter = field(default_factory=Counter)
    # anything else a step counts, e.g. the C4 filter's removed lines per rule
    counters: Counter = field(default_factory=Counter)
    # reason -> up to `sample_cap` dropped documents (id, url, text excerpt)
    samples: dict[str, list[dict]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "chars_in": self.chars_in,
            "chars_out": self.chars_out,
            "seconds": round(self.seconds, 6),
            "docs_per_s": round(self.docs_in / self.seconds, 1) if self.seconds > 0 else None,
            "dropped": dict(sorted(self.dropped.items())),
            "counters": dict(sorted(self.counters.items())),
        }

    def merge(self, other: dict) -> None:
        """Add another shard's `as_dict()` into this one (for run-level totals)."""
        for key in ("docs_in", "docs_out", "chars_in", "chars_out", "seconds"):
            setattr(self, key, getattr(self, key) + other[key])
        self.dropped.update(other["dropped"])
        self.counters.update(other.get("counters") or {})


class PipelineStep:
    """Base class: subclasses implement `process` (one document in, zero or one out) or override `run`."""

    name = "step"

    def __init__(self, sample_cap: int = 20, excerpt_chars: int = 2000) -> None:
        self.sample_cap = sample_cap
        self.excerpt_chars = excerpt_chars
        self.stats = StepStats(self.name)

    def reset_stats(self) -> None:
        self.stats = StepStats(self.name)

    def drop(self, doc: Document, reason: str) -> None:
        self.stats.dropped[reason] += 1
        bucket = self.stats.samples.setdefault(reason, [])
        if len(bucket) < self.sample_cap:
            bucket.append(
                {"id": doc.id, "url": doc.metadata.get("url"), "text": doc.text[: self.excerpt_chars]}
            )

    def process(self, doc: Document) -> Document | None:
        return doc

    def run(self, documents: Iterable[Document], rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        stats = self.stats
        for doc in documents:
            start = time.perf_counter()
            stats.docs_in += 1
            stats.chars_in += len(doc.text)
            out = self.process(doc)
            stats.seconds += time.perf_counter() - start
            if out is not None:
                stats.docs_out += 1
                stats.chars_out += len(out.text)
                yield out


class Filter(PipelineStep):
    """A step that keeps or drops documents unchanged: implement `filter(doc) -> (keep, reason)`."""

    name = "filter"

    def filter(self, doc: Document) -> tuple[bool, str | None]:
        raise NotImplementedError  # abstract

    def process(self, doc: Document) -> Document | None:
        keep, reason = self.filter(doc)
        if keep:
            return doc
        self.drop(doc, reason or self.name)
        return None
