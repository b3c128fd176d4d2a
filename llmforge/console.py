"""What `python -m llmforge.train` prints: a progress bar in steps and tokens, one line about the model,
commands that work as printed, and none of the dependencies' noise.

- `ProgressBar` (``callbacks.progress``): ``step 120/400  tokens 492k/1.64M`` with the loss, the LR in
  scientific notation, tokens/s and, for mlm/denoise, the accuracy (`progress_fields`); no epochs.
- `ModelSummary` (``callbacks.summary``): one line, llmforge's own parameter and FLOP counts, instead of
  Lightning's layer table (whose "Total FLOPs" is 0 for these models).
- `quiet_dependencies`: drops Lightning's advertisement tip, its "srun is available but not used" warning
  (llmforge decides about SLURM itself: `llmforge.slurm`) and the deprecation warnings of other packages.
- `command`: how to call a program of this Python environment from the user's shell (``python``, or
  ``.venv/bin/python`` when the venv is not activated), for the hints printed at the end of a run.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.callbacks import RichProgressBar

from llmforge.estimate.cost import human

log = logging.getLogger(__name__)

_NOISE = ("💡 Tip:", "litlogger", "Skipping setting a default `ModelSummary`")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(marker in message for marker in _NOISE)


def quiet_dependencies() -> None:
    """Silence what carries no information for llmforge's users (idempotent; call once per process)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system")
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
        warnings.filterwarnings("default", category=category, module=r"llmforge(\.|$)")


def command(program: str = "python") -> str:
    """``program`` of this interpreter's environment as the user's shell would run it: the bare name when
    the shell finds this environment's copy first (an activated venv), else its path (relative to the
    working directory when below it, e.g. ``.venv/bin/python``)."""
    bindir = Path(sys.executable).parent
    exe = bindir / program
    if not exe.exists():
        if program != "python":
            return program
        exe = Path(sys.executable)
    found = shutil.which(program)
    if found is not None and Path(found).absolute().parent == bindir.absolute():
        return program
    try:
        return os.path.relpath(exe.absolute()) if exe.absolute().is_relative_to(Path.cwd()) else str(exe)
    except ValueError:
        return str(exe)


# -- the progress bar -------------------------------------------------------------------------------
def progress_fields(
    metrics: Mapping[str, Any], step: int, max_steps: int, tokens_per_step: int | None
) -> tuple[str, dict[str, str]]:
    """(description, metrics) the progress bar shows: steps and tokens with their totals; loss, LR in
    scientific notation, tokens/s, accuracy (mlm, denoise) and validation loss when logged."""
    description = f"step {step}/{max_steps}"
    if tokens_per_step:
        description += f"  tokens {human(step * tokens_per_step)}/{human(max_steps * tokens_per_step)}"
    values = {k: float(v) for k, v in metrics.items() if _scalar(v)}
    shown: dict[str, str] = {}
    for key, label, fmt in (
        ("train/loss", "loss", "{:.3f}"),
        ("train/acc", "acc", "{:.3f}"),
        ("train/lr", "lr", "{:.2e}"),
        ("perf/tokens_per_s", "tok/s", None),
        ("val/loss", "val/loss", "{:.3f}"),
        ("val/acc", "val/acc", "{:.3f}"),
    ):
        if key in values:
            shown[label] = human(values[key]) if fmt is None else fmt.format(values[key])
    return description, shown


def _scalar(value: Any) -> bool:
    if isinstance(value, int | float):
        return True
    return hasattr(value, "numel") and value.numel() == 1


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting optimizer steps to ``trainer.max_steps`` (not epochs), with
    `progress_fields` as its text."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokens_per_step: int | None = None

    def configure_columns(self, trainer: L.Trainer) -> list:
        columns = super().configure_columns(trainer)
        return [c for c in columns if type(c).__name__ not in ("BatchesProcessedColumn",)]

    def _get_train_description(self, current_epoch: int) -> str:
        return f"step {self.trainer.global_step}/{self.trainer.max_steps}"

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.tokens_per_step is None and hasattr(pl_module, "tokens_in_batch"):
            scale = trainer.world_size * trainer.accumulate_grad_batches
            self.tokens_per_step = int(pl_module.tokens_in_batch(batch)) * scale
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-epoch
        if self.progress is not None and self.train_progress_bar_id is not None:
            description, _ = progress_fields({}, trainer.global_step, trainer.max_steps, self.tokens_per_step)
            self.progress.update(
                self.train_progress_bar_id,
                completed=trainer.global_step,
                total=trainer.max_steps,
                description=description,
            )
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        _, shown = progress_fields(
            trainer.callback_metrics, trainer.global_step, trainer.max_steps, self.tokens_per_step
        )
        return shown


# -- the model line ---------------------------------------------------------------------------------
def model_line(pl_module: Any, seq_len: int) -> str:
    """One line: the network, its parameters and its training FLOPs per corpus token, counted by
    `llmforge.estimate` (the same formulas as ``python -m llmforge.estimate`` and MFU)."""
    from llmforge.estimate import estimate

    hp = dict(pl_module.hparams)
    objective = {k: v for k, v in hp.items() if k not in ("model", "optim", "special_tokens", "data")}
    objective["name"] = hp.get("name") or "clm"
    e = estimate(pl_module.model_cfg, seq_len=seq_len, objective=objective, tokens=1.0)
    return (
        f"model  {type(pl_module.model).__name__} (objective={e.objective}, model={e.model}): "
        f"{human(e.params)} parameters ({e.params:,}), {human(e.flops_per_token)} training FLOPs per "
        f"token at seq_len {seq_len} (forward + backward)"
    )


class ModelSummary(LightningModelSummary):
    """`model_line` once at the start of training (rank 0), in place of Lightning's table."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not hasattr(pl_module, "model_cfg"):
            return
        seq_len = getattr(pl_module, "data_info", {}).get("seq_len") or pl_module.model_cfg.max_seq_len
        log.info(model_line(pl_module, int(seq_len)))
