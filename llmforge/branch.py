"""Cooldown branches of a warmup-stable-decay run.

A WSD run (``optim.schedule=wsd``) holds its peak LR through the stable phase, so every checkpoint saved
there is a point from which a short decay can be started to see what the model would be if training ended
now. A branch is a run of its own (own run dir) that starts from such a checkpoint with everything the
checkpoint holds: the weights, the AdamW moments, the step, and the data cursor, so it reads the samples
the main run would have read next::

    python -m llmforge.train experiment=demo optim.schedule=wsd name=demo-wsd      # the main run
    python -m llmforge.train experiment=demo name=demo-cool optim.schedule=wsd_decay \
        branch_from=runs/demo-wsd/checkpoints/step0000200.ckpt optim.cooldown_steps=50
    python -m llmforge.train -m experiment=demo name=demo-cool \
        branch_from=runs/demo-wsd/checkpoints/step0000200.ckpt optim.schedule=wsd_decay \
        optim.cooldown_steps=25,50,100                                                 # a sweep of branches

With ``optim.schedule=wsd_decay`` the LR decays from the peak at the branch's step s (``optim.decay_start``,
read from the checkpoint) to ``min_lr_ratio`` at s + ``optim.cooldown_steps``, with ``optim.decay_shape``;
``trainer.max_steps`` becomes s + ``cooldown_steps``. The branch checkpoint is only read. A branch that
already has checkpoints of its own continues from them with ``resume=auto`` (and after a SLURM requeue).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a Lightning checkpoint (a file, or a sharded directory) was saved at, read with
    `llmforge.checkpoints.safe_load` (tensors and plain data only)."""
    from llmforge.checkpoints import META_FILE, safe_load

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"branch_from={path}: no such checkpoint")
    source = path / META_FILE if path.is_dir() else path
    try:
        ckpt = safe_load(source, mmap=not path.is_dir())
    except FileNotFoundError:
        raise FileNotFoundError(f"branch_from={path}: a directory without {META_FILE}") from None
    except ValueError as err:  # unreadable, or refused (it would run code): the reason names the file
        raise ValueError(f"branch_from: {err}") from None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise ValueError(f"branch_from={path}: not a training checkpoint (no global_step): use init_from")
    return int(ckpt["global_step"])


def prepare(cfg: DictConfig) -> str | None:
    """For ``branch_from``: sets the decay start and ``trainer.max_steps`` of a ``wsd_decay`` branch from
    the checkpoint's step, and returns the checkpoint path to start from (None without a branch)."""
    if not cfg.branch_from:
        return None
    step = checkpoint_step(cfg.branch_from)
    if cfg.optim.schedule == "wsd_decay":
        if cfg.optim.decay_start is None:
            cfg.optim.decay_start = step
        cfg.trainer.max_steps = int(cfg.optim.decay_start) + int(cfg.optim.cooldown_steps)
    if cfg.trainer.max_steps <= step:
        raise ValueError(
            f"branch_from={cfg.branch_from} is at step {step}: trainer.max_steps={cfg.trainer.max_steps} "
            "leaves nothing to train"
        )
    return str(cfg.branch_from)
