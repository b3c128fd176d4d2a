"""The stability guard: NaN/Inf and loss-spike detection once per optimizer step, and what it does about
them (warn, skip, stop, rollback to the last good checkpoint)."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)

POLICIES = ("warn", "skip", "stop", "rollback")
_STEP_IN_NAME = re.compile(r"step=?(\d+)")


class DivergenceError(RuntimeError):
    """A run stopped by the stability guard; the message says where, why, and what the last good
    checkpoint is."""


MAD_TO_STD = 1.4826  # median absolute deviation -> standard deviation, for normal noise
MIN_RELATIVE_SCALE = 0.01  # a flat plateau's tiny noise: a spike must still be >= zscore % above the median


class StabilityGuard(L.Callback):
    """Detects NaN/Inf losses and loss spikes before the optimizer step, and acts on them.

    Once per optimizer step (all micro-batches of an accumulation cycle, averaged over all ranks so every
    rank decides alike) the training loss is checked:

    - ``nan``: the loss is NaN or infinite;
    - ``spike``: after ``warmup`` good steps, the loss exceeds ``median + zscore * scale`` of the last
      ``window`` good losses (``zscore`` null: off), or ``factor * median`` (``factor`` null: off).
      ``scale`` is the window's median absolute deviation (x 1.4826, the standard deviation of normal
      noise), at least 1% of the median. Median and MAD ignore the outliers of the window: a window that
      still holds the steep initial descent (losses 10 ... 0.005) does not inflate them as it did the mean
      and std (mean + 6 std was 22.8 there, so a jump from 0.005 to 15.5 went unflagged).

    The policy for each kind (``nan_policy``, ``spike_policy``) is one of:

    - ``warn``: log a warning and go on (the step is applied);
    - ``skip``: drop the batch: the gradients are discarded and the optimizer step does nothing (the LR
      schedule and the data go on); more than ``max_consecutive_skips`` anomalies in a row stop the run;
    - ``stop``: discard the step's gradients and end the run; `llmforge.training.run` then makes
      ``last.ckpt`` the last good checkpoint and raises `DivergenceError` with a message saying so;
    - ``rollback``: reload the model and optimizer state of the last good checkpoint and go on with the
      next batches (step count, LR schedule and data position are not rolled back: the batches in
      between are skipped, as PaLM did); after ``max_rollbacks`` the run stops.

    A checkpoint saved at step s (the weights the loss of step s is computed with) is *good* when the
    loss of step s was checked and was no anomaly. With a stop or rollback policy the guard saves the
    initial weights (the weights only: no optimizer state) as the step-0 checkpoint (``save_initial``), so
    a run that diverges before its first
    periodic checkpoint still has one to return to. Every anomaly is appended to
    ``<run_dir>/anomalies.jsonl``: step, kind, loss (mean and per rank), the window statistics, the action,
    and the sample (window) indices of the step's batches, of all ranks, with the documents of each window
    (``documents``: source, window and, per document, its id, URL or file and line; `llmforge.data.lineage`).
    """

    def __init__(
        self,
        nan_policy: str = "stop",
        spike_policy: str = "warn",
        window: int = 100,
        warmup: int = 20,
        zscore: float | None = 6.0,
        factor: float | None = None,
        max_rollbacks: int = 3,
        max_consecutive_skips: int = 10,
        save_initial: bool = True,
    ) -> None:
        for key, value in (("nan_policy", nan_policy), ("spike_policy", spike_policy)):
            if value not in POLICIES:
                raise ValueError(f"callbacks.guard.{key}={value!r} is not one of {', '.join(POLICIES)}")
        for key, value in (("window", window), ("warmup", warmup)):
            if value < 1:
                raise ValueError(f"callbacks.guard.{key}={value} must be at least 1")
        if warmup > window:
            raise ValueError(f"callbacks.guard.warmup={warmup} exceeds callbacks.guard.window={window}")
        for key, value in (("zscore", zscore), ("factor", factor)):
            if value is not None and value <= 0:
                raise ValueError(f"callbacks.guard.{key}={value} must be positive (or null: off)")
        self.nan_policy, self.spike_policy = nan_policy, spike_policy
        self.window, self.warmup = window, warmup
        self.zscore = None if zscore is None else float(zscore)
        self.factor = None if factor is None else float(factor)
        self.max_rollbacks, self.max_consecutive_skips = max_rollbacks, max_consecutive_skips
        self.save_initial = save_initial
        self.losses: deque[float] = deque(maxlen=window)
        self.bad_steps: list[int] = []
        self.rollbacks = 0
        self.consecutive = 0
        self.checked_through = -1  # last step whose loss was checked
        self.stop_reason: str | None = None
        self._micro_losses: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []

    # -- state carried in checkpoints (a resumed run keeps its window and history) --------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self.losses),
            "bad_steps": list(self.bad_steps),
            "rollbacks": self.rollbacks,
            "checked_through": self.checked_through,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = deque(state.get("losses", []), maxlen=self.window)
        self.bad_steps = list(state.get("bad_steps", []))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.checked_through = int(state.get("checked_through", -1))

    # -- hooks -------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        self._micro_losses.clear()
        self._indices.clear()
        policies = {self.nan_policy, self.spike_policy}
        ckpt = trainer.checkpoint_callback
        if not (self.save_initial and policies & {"stop", "rollback"} and ckpt is not None):
            return
        if trainer.global_step == 0 and ckpt.dirpath:
            path = Path(ckpt.format_checkpoint_name({"step": torch.tensor(0)}))
            # rank 0 decides for all: a rank that saw rank 0's file appear would skip the collective save
            if not trainer.strategy.broadcast(path.exists(), src=0):
                # the weights only: before the first step AdamW's moments are zeros (under FSDP,
                # torch.distributed.checkpoint would write them: twice the weights' size)
                trainer.save_checkpoint(path, weights_only=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if isinstance(batch, dict) and "index" in batch:
            self._indices.append(batch["index"].detach().reshape(-1))  # on the device: no sync here

    def on_before_backward(self, trainer, pl_module, loss):
        # the module's own loss: the one Lightning hands here is divided by the accumulation count and,
        # under 16-mixed, multiplied by the AMP loss scale
        own = getattr(pl_module, "last_train_loss", None)
        self._micro_losses.append((own if own is not None else loss).detach().float().reshape(()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        local = torch.stack(self._micro_losses).mean() if self._micro_losses else torch.tensor(0.0)
        loss = float(trainer.strategy.reduce(local.clone(), reduce_op="mean"))
        self.checked_through = step
        kind, stats = self.check(loss)
        if kind is None:
            self.losses.append(loss)
            self.consecutive = 0
        else:
            self.bad_steps.append(step)
            self.act(trainer, pl_module, step, kind, loss, local, stats)
        if self.bad_steps:  # no chart flat at 0: it appears with the first anomaly
            pl_module.log("guard/anomalies", float(len(self.bad_steps)), rank_zero_only=True)
        self._micro_losses.clear()
        self._indices.clear()

    # -- detection ---------------------------------------------------------------------------------
    def check(self, loss: float) -> tuple[str | None, dict[str, float]]:
        """(None | "nan" | "spike", statistics of the window the loss was compared with)."""
        if not math.isfinite(loss):
            return "nan", {}
        if len(self.losses) < self.warmup:
            return None, {}
        values = np.asarray(self.losses, dtype=np.float64)
        median = float(np.median(values))
        mad = float(np.median(np.abs(values - median)))
        scale = max(MAD_TO_STD * mad, MIN_RELATIVE_SCALE * abs(median))
        limits = []
        if self.zscore is not None:
            limits.append(median + self.zscore * scale)
        if self.factor is not None:
            limits.append(self.factor * median)
        stats = {"median": median, "mad": mad, "scale": scale}
        if limits:
            stats["threshold"] = min(limits)
            if loss > stats["threshold"]:
                return "spike", stats
        return None, stats

    # -- action ------------------------------------------------------------------------------------
    def act(self, trainer, pl_module, step, kind, loss, local, stats) -> None:
        policy = self.nan_policy if kind == "nan" else self.spike_policy
        what = f"step {step}: loss {loss:.4g}" + (
            f" > threshold {stats['threshold']:.4g} (window median {stats['median']:.4g}, "
            f"scale {stats['scale']:.3g})"
            if kind == "spike"
            else " is not finite"
        )
        action = policy
        if policy == "skip":
            self.consecutive += 1
            if self.consecutive > self.max_consecutive_skips:
                action = "stop"
                self.stop_reason = (
                    f"{kind} at {what}: more than callbacks.guard.max_consecutive_skips="
                    f"{self.max_consecutive_skips} anomalies in a row"
                )
        elif policy == "rollback":
            target = self.last_good_checkpoint(trainer)
            if self.rollbacks >= self.max_rollbacks:
                action = "stop"
                self.stop_reason = (
                    f"{kind} at {what}, after callbacks.guard.max_rollbacks={self.max_rollbacks} rollbacks"
                )
            elif target is None:
                action = "stop"
                self.stop_reason = f"{kind} at {what}, and no good checkpoint to roll back to"
            else:
                self.rollbacks += 1
                self.restore(trainer, target)
                action = f"rollback to {target.name}"
        elif policy == "stop":
            self.stop_reason = f"{kind} at {what} (callbacks.guard.{kind}_policy=stop)"
        if action != "warn":
            for p in pl_module.parameters():  # this step's gradients are not applied
                p.grad = None
        if action == "stop":
            trainer.should_stop = True
        record = {
            "step": step,
            "kind": kind,
            "loss": _json_float(loss),
            "rank_losses": [_json_float(x) for x in self._gather(trainer, local.reshape(1)).tolist()],
            **{k: _json_float(v) for k, v in stats.items()},
            "policy": policy,
            "action": action,
            "indices": self._gathered_indices(trainer),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if trainer.is_global_zero:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None and hasattr(datamodule, "sources"):  # source, id and URL per window
                from llmforge.data.lineage import describe_indices

                record["documents"] = describe_indices(datamodule, record["indices"])
            path = Path(trainer.default_root_dir) / "anomalies.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
            log.warning(f"stability guard: {kind} at {what}; {action} (recorded in {path})")

    def _gather(self, trainer, tensor: torch.Tensor) -> torch.Tensor:
        if trainer.world_size == 1:
            return tensor.cpu()
        return trainer.strategy.all_gather(tensor.to(trainer.strategy.root_device)).reshape(-1).cpu()

    def _gathered_indices(self, trainer) -> list[int]:
        local = torch.cat(self._indices).cpu() if self._indices else torch.zeros(0, dtype=torch.long)
        if trainer.world_size == 1:
            return local.tolist()
        sizes = self._gather(trainer, torch.tensor([local.numel()]))
        padded = torch.full((int(sizes.max()),), -1, dtype=torch.long)
        padded[: local.numel()] = local
        everything = self._gather(trainer, padded)
        return [int(i) for i in everything.tolist() if i >= 0]

    def last_good_checkpoint(self, trainer_or_dir) -> Path | None:
        """The newest checkpoint (file or sharded directory) saved at a step whose loss was checked and
        was no anomaly, or None."""
        if isinstance(trainer_or_dir, str | Path):
            directory = Path(trainer_or_dir)
        else:
            ckpt = trainer_or_dir.checkpoint_callback
            if ckpt is None or not ckpt.dirpath:
                return None
            directory = Path(ckpt.dirpath)
        bad = set(self.bad_steps)
        good = [(s, p) for s, p in checkpoint_steps(directory) if s <= self.checked_through and s not in bad]
        return max(good)[1] if good else None

    def set_aside_suspect(self, directory: str | Path, good: Path | None) -> Path | None:
        """Move the checkpoints saved after the last good one (weights whose loss was bad or never
        checked) to ``directory/suspect/``, so that neither a resume nor a later rollback picks them.
        Returns that folder, or None when there was nothing to move."""
        steps = checkpoint_steps(directory)
        limit = -1 if good is None else next(s for s, p in steps if p == good)
        suspect = [p for s, p in steps if s > limit]
        if not suspect:
            return None
        target = directory / "suspect"
        target.mkdir(exist_ok=True)
        for path in suspect:
            shutil.move(str(path), str(target / path.name))
        return target

    def restore(self, trainer, path: Path) -> None:
        """Load the model and optimizer state of a checkpoint into the running trainer; a checkpoint of
        the weights only (the initial ones, step 0) restarts AdamW from an empty state, as at step 0."""
        from llmforge.checkpoints import holds_training_state, strategy_load  # never runs code from the file

        full = holds_training_state(path)
        checkpoint = strategy_load(trainer.strategy, path)
        trainer.strategy.load_model_state_dict(checkpoint, strict=True)
        if full:
            trainer.strategy.load_optimizer_state_dict(checkpoint)
        else:
            for optimizer in trainer.optimizers:
                optimizer.state.clear()


def checkpoint_steps(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints (files or sharded directories) named with their step, e.g.
    ``step0000100.ckpt`` (the default `ModelCheckpoint` filename); ``last.ckpt`` and others are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for path in directory.iterdir():
        match = _STEP_IN_NAME.fullmatch(path.name.removesuffix(".ckpt"))
        if match is not None:
            out.append((int(match.group(1)), path))
    return sorted(out)


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)
