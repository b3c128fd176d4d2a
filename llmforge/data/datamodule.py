"""LightningDataModule over a token-shard directory or a weighted mixture of them, with a resumable global
data position."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Subset

from llmforge.data.dataset import GlobalCursorSampler, PackedWindows
from llmforge.data.mixture import MixtureSampler, MixtureWindows, Segment, draws_at, open_sources
from llmforge.data.shards import ShardSet, read_manifest


class ShardDataModule(L.LightningDataModule):
    """Train windows through a `GlobalCursorSampler`, validation windows in order, sliced per rank.

    The checkpointed state is the global sample cursor: samples consumed by all ranks since the start,
    advanced by ``batch_size * world_size * accumulate_grad_batches`` per optimizer step.

    With ``sources`` (name -> {path, weight}) the run trains on a mixture (`llmforge.data.mixture`): the
    sources are checked and opened here, before the first step; training draws through a
    `MixtureSampler`, validation has one loader per source (in ``source_names`` order), and the state
    also holds the mixture's segments (weights in force from which cursor on).
    """

    def __init__(
        self,
        path: str | None,
        seq_len: int,
        batch_size: int,
        collate_fn: Callable[[list[dict]], dict],
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        val_split: str = "val",
        overfit_samples: int = 0,
        sources: dict[str, dict] | None = None,
        alpha: float | None = None,
    ) -> None:
        super().__init__()
        self.sources = open_sources(sources, seq_len, alpha, val_split) if sources else []
        self.path = self.sources[0].path if self.sources else Path(path)
        self.manifest = self.sources[0].manifest if self.sources else read_manifest(self.path)
        self.segments: list[Segment] = []
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.seed, self.shuffle, self.val_split = seed, shuffle, val_split
        self.overfit_samples = overfit_samples
        self.collate_fn = collate_fn
        self.resumed_cursor = 0
        self._start_step = 0
        self.train_set: PackedWindows | MixtureWindows | Subset | None = None
        self.val_set: PackedWindows | None = None

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and self.sources:
            self.train_set = MixtureWindows(self.source_names, [s.train for s in self.sources])
        if self.train_set is None:
            self.train_set = PackedWindows(ShardSet.open(self.path, "train"), self.seq_len)
            if self.overfit_samples > 0:
                self.train_set = Subset(self.train_set, range(min(self.overfit_samples, len(self.train_set))))
            if self.val_split in self.manifest["splits"]:
                self.val_set = PackedWindows(ShardSet.open(self.path, self.val_split), self.seq_len)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def samples_per_step(self) -> int:
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        return self.batch_size * self._world()[1] * accumulate

    def cursor(self) -> int:
        step = self.trainer.global_step if self.trainer is not None else self._start_step
        return self.resumed_cursor + (step - self._start_step) * self.samples_per_step()

    def _loader(self, dataset, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = self._world()
        self._start_step = self.trainer.global_step if self.trainer is not None else 0
        return self._loader(self.train_set, sampler=self.sampler(rank, world))

    def sampler(self, rank: int = 0, world: int = 1) -> GlobalCursorSampler | MixtureSampler:
        """The train sampler of a rank, starting at the resumed cursor."""
        self.setup()
        if not self.sources:
            n, start = len(self.train_set), self.resumed_cursor
            return GlobalCursorSampler(n, self.batch_size, rank, world, self.seed, self.shuffle, start)
        self.segments = self.mixture_segments()
        return MixtureSampler(
            [len(s.train) for s in self.sources],
            [s.weight for s in self.sources],
            self.batch_size,
            rank,
            world,
            self.seed,
            self.shuffle,
            self.resumed_cursor,
            names=self.source_names,
            segments=self.segments,
        )

    def mixture_segments(self) -> list[Segment]:
        """The loaded segments, plus a new one at the resumed cursor when the sources or weights changed
        (each source then goes on from its own draw count: `llmforge.data.mixture`)."""
        names, weights = self.source_names, [s.weight for s in self.sources]
        segments = list(self.segments)
        if not segments:  # a new run (cursor 0), or a single-source checkpoint continued as a mixture
            return [Segment(self.resumed_cursor, names, weights, [0] * len(names), self.seed)]
        last = segments[-1]
        same = last.names == names and last.seed == self.seed
        if same and max(abs(a - b) for a, b in zip(last.weights, weights, strict=True)) < 1e-12:
            return segments
        done = draws_at(segments, self.resumed_cursor)
        segments.append(
            Segment(self.resumed_cursor, names, weights, [done.get(n, 0) for n in names], self.seed)
        )
        return segments

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        rank, world = self._world()
        sets = [s.val for s in self.sources] if self.sources else [self.val_set]
        loaders = []
        for val_set in sets:
            if val_set is None or len(val_set) == 0:
                continue
            per_rank = len(val_set) // world
            loaders.append(self._loader(Subset(val_set, range(rank * per_rank, (rank + 1) * per_rank))))
        if not self.sources:
            return loaders[0] if loaders else []
        return loaders

    def state_dict(self) -> dict:
        state = {"cursor": self.cursor(), "seed": self.seed, "seq_len": self.seq_len}
        if self.sources:
            state["segments"] = [seg.to_dict() for seg in (self.segments or self.mixture_segments())]
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len", self.seq_len) != self.seq_len:
            raise ValueError(
                f"checkpoint was trained with data.seq_len={state['seq_len']}, this run has {self.seq_len}: "
                "the data position would not match"
            )
        self.resumed_cursor = int(state["cursor"])
        self.seed = int(state.get("seed", self.seed))
        self.segments = [Segment.from_dict(d) for d in state.get("segments", [])] if self.sources else []
