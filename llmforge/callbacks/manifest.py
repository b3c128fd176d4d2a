"""The run manifest (git commit, package versions, data fingerprint, command line), the run's
hyperparameters in TensorBoard's HPARAMS tab, and what else TensorBoard shows first: a custom-scalars
layout of the curves that matter (loss with val loss, LR, tokens/s) and no ``epoch`` chart
(`TensorBoardLogger`)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger

from llmforge.data.shards import manifest_sha256

PACKAGES = ("torch", "lightning", "hydra-core", "omegaconf", "tokenizers", "numpy", "tensorboard", "llmforge")


def git_commit() -> dict:
    root = Path(__file__).resolve().parents[2]  # the repository (llmforge/callbacks/manifest.py)
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


def run_manifest(data_path: str | Path | None) -> dict:
    from llmforge.prep.decontaminate import read_tasks

    # a mixture (data_path None): `llmforge.data.mixture.MixtureMonitor` adds data.sources
    data = {}
    if data_path:
        data = {
            "path": str(Path(data_path).resolve()),
            "manifest_sha256": manifest_sha256(data_path),
            # the eval tasks the data stage removed overlapping documents for (None: no data manifest)
            "decontaminated_against": read_tasks(data_path),
        }
    return {
        "git": git_commit(),
        "versions": versions(),
        "data": data,
        "argv": sys.argv,
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# Metrics the HPARAMS tab shows next to each run's hyperparameters (their values are the scalars).
HPARAM_METRICS = ("val/loss", "val/ppl", "train/loss")
# The HPARAMS columns: what people compare between runs (plus the keys overridden on the command line,
# `model.num_params` and `tokens`); the whole resolved config is in config.yaml and the `config` text.
HPARAM_COLUMNS = (
    "model.name",
    "objective.name",
    "optim.lr",
    "data.batch_size",
    "data.seq_len",
    "precision.value",
    "strategy.name",
)
# TensorBoard's CUSTOM SCALARS tab: the curves to look at first.
LAYOUT = {
    "llmforge": {
        "loss (train, val)": ["Multiline", ["train/loss", "val/loss"]],
        "learning rate": ["Multiline", ["train/lr"]],
        "tokens/s": ["Multiline", ["perf/tokens_per_s"]],
    }
}


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger without the ``epoch`` scalar it adds to every write (llmforge runs
    are counted in steps; an ``epoch`` chart flat at 0 was the first one TensorBoard showed)."""

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if metrics:
            super().log_metrics(metrics, step)


def overridden_keys(argv: Iterable[str]) -> list[str]:
    """The config keys a command line sets (``optim.lr=1e-3,3e-4`` -> ``optim.lr``; ``+a.b=1`` -> ``a.b``)."""
    keys = []
    for arg in argv:
        if "=" in arg and not arg.startswith("-"):
            keys.append(arg.split("=", 1)[0].lstrip("+~"))
    return keys


def hparam_columns(config: dict[str, Any], argv: Iterable[str], extra: dict[str, Any]) -> dict[str, Any]:
    """The HPARAMS entry of a run: `HPARAM_COLUMNS`, ``extra`` (computed values), and every flat key the
    command line overrode (what a sweep varies), in that order."""
    flat = flatten(config)
    out = {key: flat[key] for key in HPARAM_COLUMNS if key in flat}
    out.update(extra)
    for key in overridden_keys(argv):
        if key in flat and key not in out:
            out[key] = flat[key]
    return out


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
    text, with the resolved config; logs `hparam_columns` as hyperparameters (TensorBoard's HPARAMS tab)
    and the custom-scalars `LAYOUT`."""

    def __init__(self, run_dir: str | Path, data_path: str | Path | None, config: dict | None = None) -> None:
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
        if experiment is not None and hasattr(experiment, "add_custom_scalars"):
            experiment.add_custom_scalars(LAYOUT)
        if experiment is not None and hasattr(experiment, "_get_file_writer") and self.config is not None:
            if hasattr(experiment, "add_text"):
                text = json.dumps(self.config, indent=2, default=str)
                experiment.add_text("config", "```\n" + text + "\n```")
            c = self.config
            extra = {"model.num_params": sum(p.numel() for p in pl_module.parameters())}
            try:
                t, d = c["trainer"], c["data"]
                global_batch = d["batch_size"] * t["accumulate_grad_batches"] * trainer.world_size
                extra["tokens"] = t["max_steps"] * global_batch * d["seq_len"]
            except (KeyError, TypeError):
                pass
            log_hparams(experiment, hparam_columns(c, sys.argv[1:], extra))
