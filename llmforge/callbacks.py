"""Callbacks every run uses: throughput, run manifest, and a sample-index recorder for debugging."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import lightning as L
import numpy as np

from llmforge.data.shards import manifest_sha256

PACKAGES = ("torch", "lightning", "hydra-core", "omegaconf", "tokenizers", "numpy", "tensorboard", "llmforge")


class Throughput(L.Callback):
    """Logs tokens/s, samples/s and step time per optimizer step; writes `perf.json` at the end.

    Times are wall-clock between consecutive optimizer-step ends, so they include data loading and
    everything Lightning does around the step. The first `warmup` steps are left out of the summary.
    """

    def __init__(self, warmup: int = 5) -> None:
        self.warmup = warmup
        self.step_times: list[float] = []
        self._last: float | None = None
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if trainer.global_step == self._last_step:
            return  # still accumulating gradients
        self._last_step = trainer.global_step
        now = time.perf_counter()
        if self._last is not None:
            dt = now - self._last
            self.step_times.append(dt)
            tokens = batch["input_ids"].numel() * trainer.world_size * trainer.accumulate_grad_batches
            samples = batch["input_ids"].shape[0] * trainer.world_size * trainer.accumulate_grad_batches
            pl_module.log("perf/tokens_per_s", tokens / dt)
            pl_module.log("perf/samples_per_s", samples / dt)
            pl_module.log("perf/step_time_s", dt)
        self._last = now

    def on_validation_start(self, trainer, pl_module):
        self._last = None  # do not count validation time as a training step

    def summary(self) -> dict:
        steady = self.step_times[self.warmup :] or self.step_times
        return {
            "steps_timed": len(steady),
            "median_step_s": float(np.median(steady)) if steady else None,
            "mean_step_s": float(np.mean(steady)) if steady else None,
        }

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and trainer.default_root_dir:
            path = Path(trainer.default_root_dir) / "perf.json"
            path.write_text(json.dumps(self.summary(), indent=2) + "\n")


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


class RunManifest(L.Callback):
    """Writes `run_manifest.json` (git commit, versions, data fingerprint) and logs it to TensorBoard."""

    def __init__(self, run_dir: str | Path, data_path: str | Path) -> None:
        self.run_dir, self.data_path = Path(run_dir), data_path

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
