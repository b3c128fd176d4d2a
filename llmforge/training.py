"""Turns a composed train config into a Lightning run: module, data, trainer, resume, final checkpoint."""

from __future__ import annotations

import ctypes
import fcntl
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf

from llmforge import branch, fp8, preflight, slurm
from llmforge.callbacks import DivergenceError, RunManifest, StabilityGuard
from llmforge.checkpoints import (
    TMP_MARK,
    CheckpointSaveError,
    atomic_checkpoint_io,
    atomic_write,
    check_resume_fits,
    holds_training_state,
    load_weights,
    remove_interrupted_writes,
    verify_for_resume,
)
from llmforge.config import check_hardware, resolve_compile, validate
from llmforge.data.datamodule import ShardDataModule
from llmforge.data.lineage import DataLog
from llmforge.data.shards import read_manifest, verify_split
from llmforge.objectives.base import PretrainModule

log = logging.getLogger(__name__)
LOCK_FILE = "run.lock"


@dataclass
class RunResult:
    run_dir: Path
    last_checkpoint: Path
    global_step: int
    metrics: dict[str, float]
    requeued: bool = False  # SLURM's warning signal: checkpoint saved, job requeued; the process should exit


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning it to the kernel after every step.

    Activations are freed and re-allocated each step; glibc's defaults unmap them each time (~100k page
    faults a step on CPU). docs/architecture.md: 17-46% faster CPU training with this.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_mmap_max, 0)


def build_module(
    cfg: DictConfig, data_manifest: dict, sources: dict[str, float] | None = None
) -> PretrainModule:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    vocab = data_manifest["vocab_size"]
    if model["vocab_size"] is None:
        model["vocab_size"] = 64 * math.ceil(vocab / 64)  # rounded up: faster matmuls, unused rows
    elif model["vocab_size"] < vocab:
        raise ValueError(
            f"model.vocab_size={model['vocab_size']} is smaller than the data's vocabulary ({vocab}); "
            "set model.vocab_size=null to take it from the data"
        )
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    data = {
        "path": str(cfg.data.path) if cfg.data.path else None,
        "seq_len": cfg.data.seq_len,
        "vocab_size": vocab,
        "seed": cfg.data.seed,
        "document_mask": cfg.data.document_mask,
        "document_positions": cfg.data.document_positions,
    }
    if sources:  # a mixture: the tokenizer is the first source's (all share it); validation per source
        data["path"] = str(cfg.data.sources[next(iter(sorted(cfg.data.sources)))].path)
        data["sources"] = dict(sources)
    try:
        module = instantiate(
            cfg.objective,
            model=model,
            optim=optim,
            special_tokens=data_manifest["special_tokens"],
            data=data,
            _convert_="all",
        )
    except InstantiationException as err:
        # the objective's own checks (special tokens, knob ranges, model shape) raise ValueError: let it
        # reach the command line as itself, a one-line error, not wrapped by Hydra
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise
    if not isinstance(module, PretrainModule):
        raise TypeError(f"objective._target_={cfg.objective._target_} is not a PretrainModule")
    module.fsdp_reshard_after_forward = cfg.strategy.reshard_after_forward
    module.activation_checkpointing = cfg.strategy.activation_checkpointing  # applied in configure_model
    module.compile_blocks = resolve_compile(cfg.strategy.compile, cfg.hardware.accelerator)
    module.float8 = cfg.precision.value == "fp8-mixed"  # torchao float8 linears, in configure_model
    return module


def build_strategy(cfg: DictConfig) -> Any:
    name = cfg.strategy.name
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        backend = "gloo" if cfg.hardware.accelerator == "cpu" else None
        return DDPStrategy(
            find_unused_parameters=cfg.strategy.find_unused_parameters, process_group_backend=backend
        )
    if name == "fsdp":
        devices = cfg.hardware.devices
        dp = int(devices) * cfg.hardware.num_nodes if str(devices).isdigit() else "auto"
        backend = "gloo" if cfg.hardware.accelerator == "cpu" else None
        return FSDPStrategy(data_parallel_size=dp, tensor_parallel_size=1, process_group_backend=backend)
    return "auto"


class FSDPStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy, without a phantom optimizer step.

    torch.distributed.checkpoint creates an empty optimizer state (a checkpoint saved before the first
    step: the stability guard's initial one) by a step with zero gradients and LR 0: weights unchanged,
    moments zero, but AdamW's step count 1, so every later bias correction differs from a run that saved
    nothing (a 27% smaller first update). The count is set back to 0: the state is then what AdamW's first
    step creates, and the run trains as DDP and one process do.
    """

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if not holds_training_state(checkpoint_path):  # weights only (the guard's step 0): no optimizer
            optimizers, self._optimizers = self._optimizers, []
            try:
                return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
            finally:
                self._optimizers = optimizers
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        inner = getattr(optimizer, "_optimizer", optimizer)  # under a LightningOptimizer
        if not inner.state:
            get_optimizer_state_dict(self.model, inner)  # creates the state, as above
            for state in inner.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"].zero_()
        return super().optimizer_state(optimizer)


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = []
    for spec in (cfg.callbacks or {}).values():
        if spec is None:
            continue
        try:
            cb = instantiate(spec)
        except InstantiationException as err:
            if isinstance(err.__cause__, ValueError):  # a callback's own check of its knobs
                raise err.__cause__ from None
            raise
        if isinstance(cb, ProgressBar) and not cfg.trainer.enable_progress_bar:
            continue
        callbacks.append(cb)
    config = OmegaConf.to_container(cfg, resolve=True)
    callbacks.append(RunManifest(cfg.run_dir, cfg.data.path, config=config))
    callbacks.append(DataLog(cfg.run_dir))  # data position per (re)start: llmforge.inspect reads it
    if cfg.data.sources:  # after RunManifest: adds the sources to run_manifest.json
        from llmforge.data.mixture import MixtureMonitor

        callbacks.append(MixtureMonitor(cfg.run_dir))
    return callbacks


def resolve_resume(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    if slurm.restart_count() > 0:
        # SLURM started this job again (requeue before the time limit, preemption): go on from where
        # it stopped, whatever `resume` says; nothing saved yet: the first attempt's start
        found = newest_loadable(ckpt_dir)
        if found is not None or cfg.resume in (None, "", "never", "auto"):
            return found
    if cfg.resume in (None, "", "never"):
        if any(ckpt_dir.glob("*.ckpt")):
            raise FileExistsError(
                f"{ckpt_dir} already holds checkpoints: pass resume=auto to continue that run, "
                "or choose another name= / run_dir="
            )
        return None
    if cfg.resume == "auto":
        return newest_loadable(ckpt_dir)
    path = Path(cfg.resume)
    if not path.exists():
        raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint")
    return str(path)


STEP_CHECKPOINT = re.compile(r"step\d+(-v\d+)?\.ckpt")


def resume_candidates(ckpt_dir: Path) -> list[Path]:
    """``last.ckpt`` and the ``step*.ckpt`` checkpoints (files, or directories when sharded), newest
    first: by modification time, ``last.ckpt`` first among equals (it is written right after its step
    checkpoint, and is the last good one after the stability guard stopped a run)."""
    found = [p for p in ckpt_dir.glob("*.ckpt") if p.name == "last.ckpt" or STEP_CHECKPOINT.fullmatch(p.name)]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)


def newest_loadable(ckpt_dir: Path) -> str | None:
    """``resume=auto``: the newest checkpoint in ``ckpt_dir`` that loads, saying which ones were skipped
    and why (damaged, or refused because it holds code: `CheckpointRefused`); None (a fresh start) only
    when there is none at all. When none loads the run stops rather than starting over on top of them."""
    candidates = resume_candidates(ckpt_dir) if ckpt_dir.is_dir() else []
    skipped = []
    for path in candidates:
        try:
            verify_for_resume(path)
        except (ValueError, OSError) as err:  # CheckpointRefused is a ValueError
            skipped.append(f"{path.name} ({err})")
            if rank_zero_only.rank == 0:
                log.warning(f"resume=auto: skipping {path}: it does not load ({err})")
            continue
        if rank_zero_only.rank == 0:
            why = f" (newer ones do not load: {'; '.join(skipped)})" if skipped else ""
            log.warning(f"resume=auto: resuming from {path}{why}")
        return str(path)
    if candidates:
        raise ValueError(
            f"resume=auto: no checkpoint in {ckpt_dir} loads ({'; '.join(skipped)}); move them aside to "
            "start over, or pass resume=<file>"
        )
    return None


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Replace dst by a copy of src (a file, or a directory for sharded checkpoints), atomically: dst is
    the old checkpoint or the complete copy (a file through `atomic_write`, fsynced)."""
    if src.is_file():
        with open(src, "rb") as f:
            atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 22))
        return
    tmp = dst.with_name(f".{dst.name}{TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(f"{dst}: could not be saved ({err}); the old one is unchanged") from None
    if dst.is_dir():
        shutil.rmtree(dst)
    tmp.replace(dst)


def stopped_by_guard(trainer: L.Trainer, guard: StabilityGuard, ckpt_dir: Path) -> None:
    """The stability guard ended the run: no final checkpoint of the suspect weights; ``last.ckpt``
    becomes the last good checkpoint (or is removed when there is none); raise `DivergenceError`."""
    last = ckpt_dir / "last.ckpt"
    good = guard.last_good_checkpoint(ckpt_dir)
    trainer.strategy.barrier()
    suspect = None
    if trainer.is_global_zero:
        suspect = guard.set_aside_suspect(ckpt_dir, good)
        if good is not None:
            copy_checkpoint(good, last)
        elif last.is_dir():
            shutil.rmtree(last)
        else:
            last.unlink(missing_ok=True)
    trainer.strategy.barrier()
    where = (
        f"last good checkpoint {good} (copied to {last}; resume=auto continues from it)"
        if good is not None
        else "no good checkpoint was saved before it (lower trainer.ckpt_every_n_steps)"
    )
    if suspect is not None:
        where += f"; the checkpoints saved after it are in {suspect}"
    raise DivergenceError(
        f"training stopped: {guard.stop_reason}; {where}; "
        f"details in {Path(trainer.default_root_dir) / 'anomalies.jsonl'}"
    )


def save_last(trainer: L.Trainer, ckpt_dir: Path) -> Path:
    """Saves the current state as ``step{N}.ckpt`` (unless saved already) and copies it to ``last.ckpt``.
    Every rank calls it; rank 0 decides whether the step checkpoint exists, so all ranks agree."""
    last = ckpt_dir / "last.ckpt"
    final = ckpt_dir / f"step{trainer.global_step:07d}.ckpt"
    if not trainer.strategy.broadcast(final.exists(), src=0):
        trainer.save_checkpoint(final, weights_only=False)
    trainer.strategy.barrier()
    if trainer.is_global_zero:
        copy_checkpoint(final, last)
    trainer.strategy.barrier()
    return last


def is_launcher_rank_zero() -> bool:
    """This process is rank 0 of the job as launched (before any process group exists): every rank
    variable a launcher sets (torchrun, SLURM, Lightning's own subprocesses) is absent or 0."""
    names = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    return all(os.environ.get(n, "0") == "0" for n in names)


def dataset_dirs(path: str | None, sources: dict | None) -> list[Path]:
    """The prepared dataset directories a run reads: ``data.path``, or each mixture source's path that holds
    a manifest (a bad one is refused afterwards, with one line naming the source, by `open_sources`)."""
    if not sources:
        return [Path(path)]
    paths = [Path(spec["path"]) for spec in sources.values() if spec and spec.get("path")]
    return [p for p in paths if (p / "manifest.json").is_file()]


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """One run per run dir: rank 0 holds an exclusive ``flock`` on ``<run_dir>/run.lock`` for the run's
    life (the kernel drops it when the process ends, however it ends); a second run is refused at once."""
    if not is_launcher_rank_zero():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise FileExistsError(
            f"{run_dir} is in use by another run (pid {holder}, lock {path}): wait for it, or choose "
            "another name= / run_dir="
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def compile_caches() -> None:
    """torch.compile's caches (Inductor's generated code, Triton's kernels) under llmforge's cache
    directory (`llmforge.prep.cache.cache_dir`: ``$LLMFORGE_CACHE_DIR``, else ``~/.cache/llmforge``)
    instead of ``/tmp``; a value already in the environment is kept. Set before the ranks start."""
    from llmforge.prep.cache import cache_dir

    base = cache_dir() / "torch-compile"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(base / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(base / "triton"))


def device_count(devices: Any) -> int:
    """Processes per node that ``hardware.devices`` asks for; 0 when the machine decides (auto, -1)."""
    if isinstance(devices, int):
        return devices if devices > 0 else 0
    if isinstance(devices, str) and devices.isdigit():
        return int(devices)
    return len(devices) if OmegaConf.is_list(devices) or isinstance(devices, list) else 0  # "auto", -1


@contextmanager
def loopback_rendezvous(cfg: DictConfig) -> Iterator[bool]:
    """When every rank runs on this machine (``hardware.num_nodes=1``, no SLURM, torchrun or ``MASTER_ADDR``
    given), nothing listens beyond loopback: torch's rendezvous store (TCPStore) binds every interface
    whatever ``MASTER_ADDR`` says, so rank 0 hosts it on a socket bound to 127.0.0.1 and every rank
    connects to it as a client (``TORCHELASTIC_USE_AGENT_STORE``, torch's own switch for a store hosted by
    someone else); gloo's own sockets use the loopback interface (``GLOO_SOCKET_IFNAME=lo``). The
    environment is set while the run lasts (Lightning's other ranks inherit it) and restored after.
    Yields whether it applied."""
    import socket

    launched = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "LOCAL_RANK")
    if (
        cfg.hardware.num_nodes != 1
        or device_count(cfg.hardware.devices) == 1  # one process: no rendezvous (strategy=auto may be DDP)
        or slurm.under_slurm()
        or any(name in os.environ for name in launched)
        or not is_launcher_rank_zero()
    ):
        yield False
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = torch.distributed.TCPStore(
        "127.0.0.1", port, is_master=True, wait_for_workers=False, master_listen_fd=sock.detach()
    )
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ.update(env)
    try:
        yield True
    finally:
        for name in env:
            os.environ.pop(name, None)
        del store  # its server stops with it


def checkpoint_io(cfg: DictConfig) -> list[Any]:
    """Checkpoint files are written atomically (`atomic_checkpoint_io`); ``strategy=fsdp`` writes sharded
    directories through torch.distributed.checkpoint instead (no CheckpointIO)."""
    return [] if cfg.strategy.name == "fsdp" else [atomic_checkpoint_io()]


def run(cfg: DictConfig) -> RunResult:
    validate(cfg)
    check_hardware(cfg)
    if cfg.precision.value == "fp8-mixed" and (reason := fp8.unsupported_reason(cfg.hardware.accelerator)):
        raise ValueError(reason)
    with run_dir_lock(Path(cfg.run_dir)), loopback_rendezvous(cfg):
        return locked_run(cfg)


def locked_run(cfg: DictConfig) -> RunResult:
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if is_launcher_rank_zero():
        for path in remove_interrupted_writes(ckpt_dir):
            log.warning(f"removed {path}: the temporary file of a save that was interrupted")
    compile_caches()
    if cfg.hardware.tune_malloc:
        keep_freed_memory()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    sources = OmegaConf.to_container(cfg.data.sources, resolve=True) if cfg.data.sources else None
    if is_launcher_rank_zero():  # once, before the ranks start: they find the result cached
        for directory in dataset_dirs(cfg.data.path, sources):
            manifest = read_manifest(directory)
            for split in manifest["splits"]:
                verify_split(directory, manifest, split)
    datamodule = ShardDataModule(  # a mixture's sources are checked here, before anything starts
        path=cfg.data.path,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        collate_fn=None,
        num_workers=cfg.data.num_workers,
        seed=cfg.data.seed,
        shuffle=cfg.data.shuffle,
        overfit_samples=cfg.data.overfit_samples,
        sources=sources,
        alpha=cfg.data.alpha,
    )
    branch_ckpt = branch.prepare(cfg)  # a cooldown branch: decay start and max_steps from its checkpoint
    ckpt_path = resolve_resume(cfg, ckpt_dir) or branch_ckpt
    if ckpt_path is not None:  # a checkpoint never runs code: refused with one line before Lightning reads it
        verify_for_resume(ckpt_path)
    preflight.check_run(cfg, datamodule.manifest["vocab_size"])  # before the model is allocated

    weights = {s.name: s.weight for s in datamodule.sources}
    module = build_module(cfg, datamodule.manifest, weights)
    datamodule.collate_fn = module.collate_fn()
    if ckpt_path is not None:
        check_resume_fits(module, ckpt_path)
    if ckpt_path is not None and not holds_training_state(ckpt_path):  # e.g. the guard's step 0
        load_weights(module, ckpt_path)
        rank_zero_info(f"resume: {ckpt_path} holds the weights only: training starts at step 0 from them")
        ckpt_path = None
    elif cfg.init_from and ckpt_path is None:  # continued pre-training; a resumed run has its own weights
        from llmforge.checkpoints import init_from

        rank_zero_info(f"init_from: loaded {init_from(module, cfg.init_from)}")
    logger = instantiate(cfg.logger) if cfg.logger and "_target_" in cfg.logger else False
    requeue = [slurm.Requeue(lambda trainer: save_last(trainer, ckpt_dir))] if slurm.under_slurm() else []
    t = cfg.trainer
    trainer = L.Trainer(
        accelerator=cfg.hardware.accelerator,
        devices=cfg.hardware.devices,
        num_nodes=cfg.hardware.num_nodes,
        strategy=build_strategy(cfg),
        precision=fp8.lightning_precision(cfg.precision.value),
        max_steps=t.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        enable_autolog_hparams=False,  # RunManifest logs the whole resolved config instead
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        logger=logger,
        callbacks=build_callbacks(cfg) + requeue,
        plugins=slurm.plugins() + checkpoint_io(cfg),
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,
    )
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    guard = next((c for c in trainer.callbacks if isinstance(c, StabilityGuard)), None)
    if guard is not None and guard.stop_reason:
        stopped_by_guard(trainer, guard, ckpt_dir)

    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    if requeue and requeue[0].requeued:  # saved at the signal; SLURM starts the job again
        return RunResult(run_dir, ckpt_dir / "last.ckpt", trainer.global_step, metrics, requeued=True)
    last = save_last(trainer, ckpt_dir)
    return RunResult(run_dir, last, trainer.global_step, metrics)
