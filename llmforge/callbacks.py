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


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched against the device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}


def device_peak_flops() -> float | None:
    """bf16 peak of the local CUDA device, or None (CPU, or a GPU missing from the table)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


class Throughput(L.Callback):
    """Logs tokens/s, samples/s, step time and MFU per optimizer step; writes `perf.json` at the end.

    Times are wall-clock between consecutive optimizer-step ends, so they include data loading and
    everything Lightning does around the step. The first `warmup` steps are left out of the summary.
    MFU = flops_per_token * tokens/s / (peak bf16 FLOP/s per device * devices), with flops_per_token the
    PaLM formula (6N + 12 * layers * d_model * seq_len); only on known GPUs. The objective says what a token
    is (`PretrainModule.tokens_in_batch`: the corpus tokens a batch consumes, ``seq_len`` per sample for
    every objective) and what it costs (`PretrainModule.flops_per_token`).
    """

    def __init__(self, warmup: int = 5) -> None:
        self.warmup = warmup
        self.step_times: list[float] = []
        self.tokens_per_step = 0
        self.flops_per_token: float | None = None
        self.peak: float | None = None
        self._last: float | None = None
        self._last_step = -1

    def on_train_start(self, trainer, pl_module):
        self.peak = (
            device_peak_flops() if trainer.accelerator.__class__.__name__ == "CUDAAccelerator" else None
        )

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
                pl_module.log(
                    "perf/mfu",
                    self.flops_per_token * self.tokens_per_step / dt / (self.peak * trainer.world_size),
                )
        self._last = now

    def on_validation_start(self, trainer, pl_module):
        self._last = None  # do not count validation time as a training step

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
            out["mfu"] = self.flops_per_token * out["tokens_per_s"] / (self.peak * world_size)
            out["peak_flops_per_device"] = self.peak
        return out

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and trainer.default_root_dir:
            path = Path(trainer.default_root_dir) / "perf.json"
            path.write_text(json.dumps(self.summary(trainer.world_size), indent=2) + "\n")


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
