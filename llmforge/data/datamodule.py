"""LightningDataModule over a token-shard directory, with a resumable global data position."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Subset

from llmforge.data.dataset import GlobalCursorSampler, PackedWindows
from llmforge.data.shards import ShardSet, read_manifest


class ShardDataModule(L.LightningDataModule):
    """Train windows through a `GlobalCursorSampler`, validation windows in order, sliced per rank.

    The checkpointed state is the global sample cursor: samples consumed by all ranks since the start,
    advanced by ``batch_size * world_size * accumulate_grad_batches`` per optimizer step.
    """

    def __init__(
        self,
        path: str,
        seq_len: int,
        batch_size: int,
        collate_fn: Callable[[list[dict]], dict],
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        val_split: str = "val",
        overfit_samples: int = 0,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.seed, self.shuffle, self.val_split = seed, shuffle, val_split
        self.overfit_samples = overfit_samples
        self.collate_fn = collate_fn
        self.resumed_cursor = 0
        self._start_step = 0
        self.train_set: PackedWindows | Subset | None = None
        self.val_set: PackedWindows | None = None

    def setup(self, stage: str | None = None) -> None:
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
        sampler = GlobalCursorSampler(
            len(self.train_set), self.batch_size, rank, world, self.seed, self.shuffle, self.resumed_cursor
        )
        return self._loader(self.train_set, sampler=sampler)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self.val_set is None or len(self.val_set) == 0:
            return []
        rank, world = self._world()
        per_rank = len(self.val_set) // world
        return self._loader(Subset(self.val_set, range(rank * per_rank, (rank + 1) * per_rank)))

    def state_dict(self) -> dict:
        return {"cursor": self.cursor(), "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len", self.seq_len) != self.seq_len:
            raise ValueError(
                f"checkpoint was trained with data.seq_len={state['seq_len']}, this run has {self.seq_len}: "
                "the data position would not match"
            )
        self.resumed_cursor = int(state["cursor"])
        self.seed = int(state.get("seed", self.seed))
