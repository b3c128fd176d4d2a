"""Callbacks every run uses, one concept per module:

- `throughput`: tokens/s, samples/s, step time, MFU and peak device memory (`Throughput`, `mfu`);
- `grad_norm`: the gradient norm before clipping (`GradNorm`);
- `stability`: the stability guard, NaN/Inf and loss-spike detection and what to do about them
  (`StabilityGuard`, `DivergenceError`, `checkpoint_steps`);
- `manifest`: the run manifest, the hyperparameters and the first view in TensorBoard (`RunManifest`,
  `TensorBoardLogger`);
- `sample_indices`: the windows each rank trains on (`SampleIndexRecorder`, for checks and tests);
- `sample_text`: what the model writes while it trains, in TensorBoard (`SampleText`);
- `downstream`: lm-eval tasks on the training model every N steps (`DownstreamEval`, off by default).

Every callback is importable from here (``_target_: llmforge.callbacks.<Name>`` in ``conf/callbacks/``).
TensorBoard tags and their meaning are listed in docs/monitoring.md.
"""

from llmforge.callbacks.downstream import DownstreamEval
from llmforge.callbacks.grad_norm import GradNorm, total_grad_norm
from llmforge.callbacks.manifest import (
    HPARAM_COLUMNS,
    HPARAM_METRICS,
    LAYOUT,
    PACKAGES,
    RunManifest,
    TensorBoardLogger,
    flatten,
    git_commit,
    hparam_columns,
    hparam_value,
    log_hparams,
    run_manifest,
    versions,
)
from llmforge.callbacks.sample_indices import SampleIndexRecorder
from llmforge.callbacks.sample_text import SampleText
from llmforge.callbacks.stability import POLICIES, DivergenceError, StabilityGuard, checkpoint_steps
from llmforge.callbacks.throughput import PEAK_BF16_FLOPS, Throughput, device_peak_flops, mfu

__all__ = [
    "HPARAM_COLUMNS",
    "HPARAM_METRICS",
    "LAYOUT",
    "PACKAGES",
    "PEAK_BF16_FLOPS",
    "POLICIES",
    "DivergenceError",
    "DownstreamEval",
    "GradNorm",
    "RunManifest",
    "SampleIndexRecorder",
    "SampleText",
    "StabilityGuard",
    "TensorBoardLogger",
    "Throughput",
    "checkpoint_steps",
    "device_peak_flops",
    "flatten",
    "git_commit",
    "hparam_columns",
    "hparam_value",
    "log_hparams",
    "mfu",
    "run_manifest",
    "total_grad_norm",
    "versions",
]
