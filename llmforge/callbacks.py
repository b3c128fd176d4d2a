"""Callbacks every run uses: throughput and MFU, gradient norm, device memory, the stability guard
(NaN/Inf and loss-spike detection), the run manifest and hyperparameters, and a sample-index recorder.

TensorBoard tags and their meaning are listed in README.md ("Monitoring").
"""

from __future__ import annotations

import json
import logging
import math
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from llmforge.data.shards import manifest_sha256

log = logging.getLogger(__name__)

PACKAGES = ("torch", "lightning", "hydra-core", "omegaconf", "tokenizers", "numpy", "tensorboard", "llmforge")


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched against the device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
    "V100": 125e12,  # fp16: the V100 has no bf16
}


def device_peak_flops() -> float | None:
    """bf16 peak of the local CUDA device, or None (CPU, or a GPU missing from the table)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_per_device: float, devices: int) -> float:
    """Model FLOPs utilisation: the model FLOP/s the run achieves over the hardware's peak.

        MFU = flops_per_token * tokens_per_s / (peak_flops_per_device * devices)

    ``flops_per_token`` is the training cost of one token (forward + backward, PaLM appendix B:
    6 * N + 12 * n_layers * d_model * seq_len for a decoder, per objective in
    `PretrainModule.flops_per_token`); ``tokens_per_s`` counts the tokens of all devices; the peak is the
    dense bf16 tensor-core peak of one device (`PEAK_BF16_FLOPS`). Recomputation (activation
    checkpointing) is not counted: this is MFU, not hardware FLOPs utilisation.
    """
    return flops_per_token * tokens_per_s / (peak_flops_per_device * devices)


class Throughput(L.Callback):
    """Logs tokens/s, samples/s, step time and MFU per optimizer step; writes `perf.json` at the end.

    Times are wall-clock between consecutive optimizer-step ends, minus validation, so they include data
    loading and everything Lightning does around the step. The first `warmup` steps are left out of the
    summary.
    MFU (see `mfu`) is logged on CUDA devices found in `PEAK_BF16_FLOPS` only: on a CPU, or an unknown
    GPU, there is no honest peak and ``perf/mfu`` is not logged at all. The objective says what a token
    is (`PretrainModule.tokens_in_batch`: the corpus tokens a batch consumes, ``seq_len`` per sample for
    every objective) and what it costs (`PretrainModule.flops_per_token`).
    On CUDA it also logs the peak device memory since the start of training (``memory/max_allocated_gib``:
    tensors; ``memory/max_reserved_gib``: what the caching allocator holds).
    """

    def __init__(self, warmup: int = 5) -> None:
        self.warmup = warmup
        self.step_times: list[float] = []
        self.tokens_per_step = 0
        self.flops_per_token: float | None = None
        self.peak: float | None = None
        self._last: float | None = None
        self._last_step = -1
        self._val_start = 0.0
        self.cuda = False

    def on_train_start(self, trainer, pl_module):
        self.cuda = trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
        self.peak = device_peak_flops() if self.cuda else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if trainer.global_step == self._last_step:
            return  # still accumulating gradients
        self._last_step = trainer.global_step
        now = time.perf_counter()
        scale = trainer.world_size * trainer.accumulate_grad_batches
        counts = hasattr(pl_module, "tokens_in_batch")  # a PretrainModule: it knows what a token is
        tokens = pl_module.tokens_in_batch(batch) if counts else batch["input_ids"].numel()
        self.tokens_per_step = tokens * scale
        if self.flops_per_token is None and counts:
            self.flops_per_token = pl_module.flops_per_token(batch)
        if self._last is not None:
            dt = now - self._last
            self.step_times.append(dt)
            pl_module.log("perf/tokens_per_s", self.tokens_per_step / dt)
            pl_module.log("perf/samples_per_s", batch["input_ids"].shape[0] * scale / dt)
            pl_module.log("perf/step_time_s", dt)
            if self.peak and self.flops_per_token:
                value = mfu(self.flops_per_token, self.tokens_per_step / dt, self.peak, trainer.world_size)
                pl_module.log("perf/mfu", value)
        if self.cuda:
            pl_module.log("memory/max_allocated_gib", torch.cuda.max_memory_allocated() / 2**30)
            pl_module.log("memory/max_reserved_gib", torch.cuda.max_memory_reserved() / 2**30)
        self._last = now

    def on_validation_start(self, trainer, pl_module):
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if self._last is not None:  # do not count validation time as training time
            self._last += time.perf_counter() - self._val_start

    def summary(self, world_size: int = 1) -> dict:
        steady = self.step_times[self.warmup :] or self.step_times
        if not steady:
            return {"steps_timed": 0}
        median = float(np.median(steady))
        out = {
            "steps_timed": len(steady),
            "median_step_s": median,
            "mean_step_s": float(np.mean(steady)),
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_s": self.tokens_per_step / median,
            "flops_per_token": self.flops_per_token,
        }
        if self.peak and self.flops_per_token:
            out["mfu"] = mfu(self.flops_per_token, out["tokens_per_s"], self.peak, world_size)
            out["peak_flops_per_device"] = self.peak
        return out

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and trainer.default_root_dir:
            path = Path(trainer.default_root_dir) / "perf.json"
            path.write_text(json.dumps(self.summary(trainer.world_size), indent=2) + "\n")


def total_grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients together, as `torch.nn.utils.clip_grad_norm_` computes it (0 if none).

    Under FSDP2 the gradients are DTensor shards: the norm is reduced over the shards (``full_tensor``),
    so every rank gets the norm of the whole model's gradient, not of its own shard.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    if hasattr(norm, "full_tensor"):  # a DTensor: partial norms on each rank
        norm = norm.full_tensor()
    return norm


class GradNorm(L.Callback):
    """Logs ``train/grad_norm``: the total norm of the gradients before clipping, once per optimizer step.

    Lightning calls ``on_before_optimizer_step`` after the backward pass of the last micro-batch (and
    after AMP unscaling) and before it clips: the logged norm is the unclipped one, the figure to compare
    with ``trainer.gradient_clip_val``. Logged through ``self.log``, so ``trainer.log_every_n_steps``
    applies; the norm is only computed on the steps that are logged.
    """

    def __init__(self, norm_type: float = 2.0) -> None:
        self.norm_type = float(norm_type)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        n = max(1, trainer.log_every_n_steps)
        if (trainer.global_step + 1) % n != 0:
            return
        norm = total_grad_norm(pl_module.parameters(), self.norm_type)
        pl_module.log("train/grad_norm", norm.float())


POLICIES = ("warn", "skip", "stop", "rollback")
_STEP_IN_NAME = re.compile(r"step=?(\d+)")


class DivergenceError(RuntimeError):
    """A run stopped by the stability guard; the message says where, why, and what the last good
    checkpoint is."""


class StabilityGuard(L.Callback):
    """Detects NaN/Inf losses and loss spikes before the optimizer step, and acts on them.

    Once per optimizer step (all micro-batches of an accumulation cycle, averaged over all ranks so every
    rank decides alike) the training loss is checked:

    - ``nan``: the loss is NaN or infinite;
    - ``spike``: after ``warmup`` good steps, the loss exceeds ``mean + zscore * std`` of the last
      ``window`` good losses (``zscore`` null: off), or ``factor * mean`` (``factor`` null: off).

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
    initial weights as the step-0 checkpoint (``save_initial``), so a run that diverges before its first
    periodic checkpoint still has one to return to. Every anomaly is appended to
    ``<run_dir>/anomalies.jsonl``: step, kind, loss (mean and per rank), the window statistics, the action,
    and the sample (window) indices of the step's batches, of all ranks.
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
                trainer.save_checkpoint(path, weights_only=False)

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
        mean, std = float(values.mean()), float(values.std())
        limits = []
        if self.zscore is not None:
            limits.append(mean + self.zscore * std)
        if self.factor is not None:
            limits.append(self.factor * mean)
        stats = {"mean": mean, "std": std}
        if limits:
            stats["threshold"] = min(limits)
            if loss > stats["threshold"]:
                return "spike", stats
        return None, stats

    # -- action ------------------------------------------------------------------------------------
    def act(self, trainer, pl_module, step, kind, loss, local, stats) -> None:
        policy = self.nan_policy if kind == "nan" else self.spike_policy
        what = f"step {step}: loss {loss:.4g}" + (
            f" > threshold {stats['threshold']:.4g} (window mean {stats['mean']:.4g}, std {stats['std']:.3g})"
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
        """Load the model and optimizer state of a checkpoint into the running trainer."""
        from llmforge.checkpoints import strategy_load  # never runs code from the file

        checkpoint = strategy_load(trainer.strategy, path)
        trainer.strategy.load_model_state_dict(checkpoint, strict=True)
        trainer.strategy.load_optimizer_state_dict(checkpoint)


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


class SampleIndexRecorder(L.Callback):
    """Writes the window indices each rank trains on to `samples/rank{r}.txt` (one line per batch)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        out = Path(trainer.default_root_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"rank{trainer.global_rank}.txt", "a") as f:
            f.write(" ".join(str(i) for i in batch["index"].tolist()) + "\n")


def git_commit() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_manifest(data_path: str | Path) -> dict:
    return {
        "git": git_commit(),
        "versions": versions(),
        "data": {"path": str(Path(data_path).resolve()), "manifest_sha256": manifest_sha256(data_path)},
        "argv": sys.argv,
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# Metrics the HPARAMS tab shows next to each run's hyperparameters (their values are the scalars).
HPARAM_METRICS = ("val/loss", "val/ppl", "train/loss")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"optim.lr": 3e-4, ...}: keys as Hydra overrides write them."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def hparam_value(value: Any) -> int | float | str | bool:
    """What TensorBoard's HPARAMS plugin accepts: numbers, strings and booleans (the rest as text)."""
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def log_hparams(experiment: Any, params: dict[str, Any], metrics: Iterable[str] = HPARAM_METRICS) -> None:
    """Write one HPARAMS entry for the run: ``params`` (flat) and the names of the metrics to show."""
    from torch.utils.tensorboard.summary import hparams

    clean = {key: hparam_value(value) for key, value in params.items()}
    writer = experiment._get_file_writer()
    for summary in hparams(clean, dict.fromkeys(metrics, 0.0)):  # only the metric names are used
        writer.add_summary(summary)
    writer.flush()


class RunManifest(L.Callback):
    """Writes `run_manifest.json` (git commit, versions, data fingerprint) and logs it to TensorBoard as
    text; logs the resolved run config, flattened, as hyperparameters (TensorBoard's HPARAMS tab), with the
    model's resolved vocabulary size and parameter count."""

    def __init__(self, run_dir: str | Path, data_path: str | Path, config: dict | None = None) -> None:
        self.run_dir, self.data_path = Path(run_dir), data_path
        self.config = config

    def on_fit_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        manifest = run_manifest(self.data_path)
        manifest["world_size"] = trainer.world_size
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "run_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text("run_manifest", "```\n" + json.dumps(manifest, indent=2) + "\n```")
        if experiment is not None and hasattr(experiment, "_get_file_writer") and self.config is not None:
            params = flatten(self.config)
            model_cfg = getattr(pl_module, "model_cfg", None)
            if model_cfg is not None:
                params["model.vocab_size"] = model_cfg.vocab_size
            params["model.num_params"] = sum(p.numel() for p in pl_module.parameters())
            params["world_size"] = trainer.world_size
            params["git.commit"] = manifest["git"]["commit"]
            log_hparams(experiment, params)
