"""The run manifest (git commit, package versions, data fingerprint, command line) and the run's
hyperparameters in TensorBoard's HPARAMS tab."""

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
        if experiment is not None and hasattr(experiment, "_get_file_writer") and self.config is not None:
            params = flatten(self.config)
            model_cfg = getattr(pl_module, "model_cfg", None)
            if model_cfg is not None:
                params["model.vocab_size"] = model_cfg.vocab_size
            params["model.num_params"] = sum(p.numel() for p in pl_module.parameters())
            params["world_size"] = trainer.world_size
            params["git.commit"] = manifest["git"]["commit"]
            log_hparams(experiment, params)
