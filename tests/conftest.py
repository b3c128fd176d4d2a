"""Shared fixtures: a tiny real token dataset (tokenizer trained in-process) and Hydra composition."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from llmforge.config import register

ROOT = Path(__file__).resolve().parent.parent
# Hermetic: nothing cached by earlier runs on this machine (llmforge.prep.cache) is seen.
os.environ["LLMFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="llmforge-test-cache-")
# Recording callbacks of the tests (`+callbacks.x._target_=tests....`) are allowed targets (llmforge.config).
os.environ["LLMFORGE_EXTRA_TARGETS"] = "tests."
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


@pytest.fixture(scope="session")
def tiny_mixture(tmp_path_factory) -> dict[str, Path]:
    """Two sources with one shared 512-token tokenizer: "web" (module docs) and "code" (Python sources)."""
    from llmforge.prep.text import stdlib_documents, stdlib_sources
    from llmforge.prep.tokenizer import train_bpe
    from llmforge.prep.writers import write_token_dataset

    docs = list(islice(stdlib_documents(), 30))
    code = [(str(p.name), p.read_text(encoding="utf-8")[:6000]) for p in stdlib_sources()[:40]]
    tok = train_bpe((t for _, t in docs + code), vocab_size=512, num_sentinels=8)
    root = tmp_path_factory.mktemp("mixture")
    for name, items in (("web", docs), ("code", code)):
        write_token_dataset(items, tok, root / name, val_fraction=0.15)
    return {"web": root / "web", "code": root / "code"}


def mixture_overrides(sources: dict[str, Path], web: float = 0.7, code: float = 0.3) -> list[str]:
    return [
        "data=mixture",
        f"data.sources.web.path={sources['web']}",
        f"data.sources.web.weight={web}",
        f"data.sources.code.path={sources['code']}",
        f"data.sources.code.weight={code}",
    ]


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


# -- what the objectives' tests share (test_mlm.py, test_denoise.py) ------------------------------------
def overfit(train_cfg, objective: str, precision: str, hardware: str, steps: int) -> tuple[float, ...]:
    """Train ``objective`` on one fixed batch (``debug=overfit``) in this process; checks ``perf.json``
    (4 x 32 tokens per step, FLOPs counted) and returns (first train loss, last train loss, last accuracy)."""
    import json

    from llmforge.curves import read_scalars
    from llmforge.training import run

    overrides = (f"precision={precision}", f"hardware={hardware}", f"trainer.max_steps={steps}")
    result = run(train_cfg(f"objective={objective}", "debug=overfit", *overrides))
    scalars = read_scalars(result.run_dir)
    loss, acc = dict(scalars["train/loss"]), dict(scalars["train/acc"])
    perf = json.loads((result.run_dir / "perf.json").read_text())
    assert perf["tokens_per_step"] == 4 * 32 and perf["flops_per_token"] > 0
    return loss[min(loss)], loss[max(loss)], acc[max(acc)]


def train_two_processes(tmp_path: Path, tiny_data: Path, name: str, *overrides: str, steps: int = 3) -> Path:
    """``python -m llmforge.train`` with two CPU ranks on the tiny data (``debug=fast``, ``model=tiny``,
    windows of 32 tokens); checks it succeeded and returns the run directory."""
    proc = run_cli(
        "llmforge.train",
        *overrides,
        "hardware.devices=2",
        "debug=fast",
        f"trainer.max_steps={steps}",
        "model=tiny",
        f"data.path={tiny_data}",
        "data.seq_len=32",
        f"name={name}",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp_path / "runs" / name


def ddp_three_steps(tmp_path: Path, tiny_data: Path, objective: str) -> dict:
    """Three steps of ``objective`` under 2-process DDP, batches of 3: the run logged training and
    validation loss and accuracy, and its last checkpoint's data position counts both ranks' windows.
    Returns that checkpoint."""
    from llmforge.curves import read_scalars

    name = f"{objective}-ddp"
    run_dir = train_two_processes(
        tmp_path, tiny_data, name, f"objective={objective}", "strategy=ddp", "data.batch_size=3"
    )
    scalars = read_scalars(run_dir)
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(scalars)
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["ShardDataModule"]["cursor"] == 3 * 3 * 2
    return ck


# -- 2-process runs shared by several tests -------------------------------------------------------------
# Each 2-rank job pays for two interpreters importing torch and Lightning and for gloo's rendezvous before
# its first step, so the runs below are started once per session and read by several tests. Their
# directories are read-only for those tests: a test that must write there works on a copy.

# The reference runs (tests/test_fsdp.py::test_fsdp_ddp_and_one_process_agree_...): what FSDP, DDP and one
# process share -- the same data and global batch (2 ranks x 2 = 1 process x 4), a checkpoint every 2 steps,
# 4 steps (the LR schedule's horizon is set: a run stopped at step 2 and resumed follows the same LR).
REFERENCE = (
    "debug=fast",
    "optim.decay_steps=4",
    "trainer.ckpt_every_n_steps=2",
    "trainer.val_check_interval=100",
    "optim.lr=1e-2",
    "optim.warmup_steps=0",
)


def reference_cli(tiny_data: Path) -> tuple[str, ...]:
    """The reference runs' command-line part: two ranks of batch 2 on the tiny data, activation
    checkpointing, the initial weights saved, the live model's logits on a probe recorded at the end."""
    return (
        "model=tiny",
        f"data.path={tiny_data}",
        "data.seq_len=32",
        "data.batch_size=2",
        "hardware.devices=2",
        "strategy.activation_checkpointing=true",
        "callbacks.guard.save_initial=true",  # a checkpoint before the first step (see FSDPStrategy)
        "+callbacks.probe._target_=tests.test_fsdp.RecordLogits",
    )


@dataclass(frozen=True)
class SharedRun:
    """A finished run (read-only): where it ran (``cwd``), its run directory, the CLI calls it took."""

    cwd: Path
    run_dir: Path
    procs: tuple[subprocess.CompletedProcess, ...]


def cli_ok(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = run_cli(module, *args, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="session")
def fsdp_run(tmp_path_factory, tiny_data) -> SharedRun:
    """The FSDP2 reference run (clm, 2 ranks): 2 steps, then continued to 4 with ``resume=auto`` from its
    sharded checkpoint; SampleText at every step (rank 0 writes, every rank gathers); its sharded
    ``last.ckpt`` then consolidated by ``python -m llmforge.consolidate`` (``last.consolidated.ckpt``).
    Read by tests/test_train.py, test_fsdp.py and test_generate.py."""
    cwd = tmp_path_factory.mktemp("fsdp-run")
    args = (
        *REFERENCE,
        *reference_cli(tiny_data),
        "strategy=fsdp",
        "name=fsdp",
        "callbacks.sample_text.every_n_steps=1",
        "callbacks.sample_text.max_new_tokens=5",
    )
    first = cli_ok("llmforge.train", *args, "trainer.max_steps=2", cwd=cwd)
    second = cli_ok("llmforge.train", *args, "trainer.max_steps=4", "resume=auto", cwd=cwd)
    run_dir = cwd / "runs" / "fsdp"
    consolidated = cli_ok("llmforge.consolidate", str(run_dir / "checkpoints" / "last.ckpt"), cwd=cwd)
    return SharedRun(cwd, run_dir, (first, second, consolidated))


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory, tiny_data) -> SharedRun:
    """The DDP reference run (clm, 2 ranks, 4 steps) into an explicit ``run_dir`` outside its working
    directory; each rank records the windows it trained on (``samples/rank{r}.txt``) and its listening
    addresses (``listeners.{r}.json``). Read by tests/test_train.py, test_fsdp.py and test_run_safety.py."""
    cwd = tmp_path_factory.mktemp("ddp-cwd")
    run_dir = tmp_path_factory.mktemp("ddp-run") / "run"
    proc = cli_ok(
        "llmforge.train",
        *REFERENCE,
        *reference_cli(tiny_data),
        "trainer.max_steps=4",
        "strategy=ddp",
        f"run_dir={run_dir}",
        "+callbacks.samples._target_=llmforge.callbacks.SampleIndexRecorder",
        "+callbacks.net._target_=tests.test_run_safety.RecordListeners",
        cwd=cwd,
    )
    return SharedRun(cwd, run_dir, (proc,))


def random_windows(
    n: int,
    seq_len: int,
    *,
    low: int,
    high: int,
    seed: int = 0,
    pad_last: int = 0,
    eos: int | None = None,
    first_index: int = 0,
    index_step: int = 1,
) -> list[dict]:
    """Samples as `PackedWindows` yields them: n windows of seq_len + 1 random token ids in [low, high),
    with ``eos`` (document ends) sprinkled in at 3% when given, the last ``pad_last`` tokens of the last
    window padded (-1), indices ``first_index + index_step * i``."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(low, high, size=(n, seq_len + 1))
    if eos is not None:
        tokens[rng.random(tokens.shape) < 0.03] = eos
    if pad_last:
        tokens[-1, -pad_last:] = -1
    return [{"index": first_index + index_step * i, "tokens": t} for i, t in enumerate(tokens)]


# The data stage's outputs compared across executors (local, SLURM, Ray): a small demo crawl, and its files.
OUTPUTS = ("manifest.json", "tokenizer.json", "*.bin", "*.idx")


def demo_crawl(tmp_path_factory, modules: int) -> Path:
    """A 4-file demo crawl of ``modules`` stdlib modules (pydoc pages and docstring articles)."""
    out = tmp_path_factory.mktemp("crawl")
    subprocess.run(
        [sys.executable, "-m", "llmforge.prep.demo_warc", str(out), "--modules", str(modules)],
        check=True,
        env=clean_env(),
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def crawl(tmp_path_factory) -> Path:
    """8 modules' demo crawl, made once: read-only input of the executors' tests."""
    return demo_crawl(tmp_path_factory, 8)


def crawl_args(crawl: Path) -> list[str]:
    """``python -m llmforge.prepare`` of the crawl as the executors' tests run it (output_dir left out)."""
    return [
        f"input={crawl}/*.warc.gz",
        "tokenizer.vocab_size=600",
        "tokenizer.num_sentinels=8",
        "progress=false",
        "filters.language.enabled=false",
    ]


@pytest.fixture(scope="session")
def crawl_local(crawl, tmp_path_factory) -> Path:
    """`crawl_args` with the local executor, made once: the output SLURM's and Ray's must equal."""
    out = tmp_path_factory.mktemp("crawl-local") / "local"
    proc = run_cli("llmforge.prepare", *crawl_args(crawl), f"output_dir={out}", cwd=out.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def outputs(out: Path) -> dict[str, bytes]:
    files = sorted(p for pattern in OUTPUTS for p in out.glob(pattern))
    return {p.name: p.read_bytes() for p in files}
