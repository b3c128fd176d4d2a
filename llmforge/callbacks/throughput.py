"""Throughput and MFU: tokens/s, samples/s, step time, model FLOPs utilisation and peak device memory
per optimizer step (TensorBoard tags ``perf/*``, ``memory/*``), and ``perf.json`` at the end of a run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

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
