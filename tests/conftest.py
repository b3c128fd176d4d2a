"""Shared fixtures: a tiny real token dataset (tokenizer trained in-process) and Hydra composition."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from itertools import islice
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from llmforge.config import register

ROOT = Path(__file__).resolve().parent.parent
# Hermetic: nothing cached by earlier runs on this machine (llmforge.prep.cache) is seen.
os.environ["LLMFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="llmforge-test-cache-")
CONF = ROOT / "conf"
register()


# Every precision CLM supports, each on the hardware it needs (16-mixed only on a GPU).
PRECISIONS = [
    ("32-true", "cpu"),
    ("bf16-mixed", "cpu"),
    ("bf16-true", "cpu"),
    pytest.param("16-mixed", "gpu", marks=pytest.mark.gpu),
]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """~60 standard-library modules' docs -> 512-token BPE -> train/val shards."""
    from llmforge.prep.text import stdlib_documents
    from llmforge.prep.tokenizer import train_bpe
    from llmforge.prep.writers import write_token_dataset

    docs = list(islice(stdlib_documents(), 60))
    tok = train_bpe((t for _, t in docs), vocab_size=512, num_sentinels=8)
    out = tmp_path_factory.mktemp("data") / "tiny"
    write_token_dataset(docs, tok, out, val_fraction=0.1)
    return out


def compose_train(overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides or [])


@pytest.fixture
def train_cfg(tiny_data, tmp_path):
    """compose_train with the tiny dataset, a temporary run dir and quiet output."""

    def make(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        base = [
            f"data.path={tiny_data}",
            f"run_dir={run_dir or tmp_path / 'run'}",
            "model=tiny",
            "data.seq_len=32",
            "data.batch_size=4",
            "trainer.enable_progress_bar=false",
        ]
        return compose_train(base + list(overrides))

    return make


def clean_env() -> dict[str, str]:
    """The environment minus anything a distributed launcher (or pytest) left behind."""
    drop = (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "GROUP_RANK",
        "PL_",
        "SLURM_",
        "TORCHELASTIC",
        "PYTEST_",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_cli(module: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
