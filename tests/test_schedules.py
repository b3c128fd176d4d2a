"""Warmup-stable-decay (``optim.schedule=wsd``) and cooldown branches (``branch_from`` + ``wsd_decay``)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from llmforge.branch import checkpoint_step
from llmforge.config import validate
from llmforge.objectives.base import decay_curve, lr_factor, wsd_decay_start
from llmforge.training import run
from tests.conftest import compose_train, run_cli
from tests.test_resume import all_scalars


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_decay_curves_go_from_one_to_zero(shape):
    ps = [i / 100 for i in range(101)]
    f = [decay_curve(p, shape) for p in ps]
    assert f[0] == 1.0 and f[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(b < a for a, b in zip(f, f[1:], strict=False))
    expected = {"linear": 0.5, "cosine": 0.5, "1-sqrt": 1 - math.sqrt(0.5)}[shape]
    assert decay_curve(0.5, shape) == pytest.approx(expected)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_warms_up_holds_the_peak_then_decays_over_the_last_fraction(shape):
    total, warmup, min_ratio = 100, 10, 0.1
    start = wsd_decay_start(total, 0.2)
    assert start == 80
    kw = dict(
        warmup=warmup, total=total, schedule="wsd", min_ratio=min_ratio, decay_start=start, decay_shape=shape
    )
    f = [lr_factor(s, **kw) for s in range(total + 20)]
    assert f[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert f[warmup : start + 1] == [1.0] * (start + 1 - warmup)  # stable, and the decay starts at 1
    decay = f[start : total + 1]
    assert all(b < a for a, b in zip(decay, decay[1:], strict=False))
    assert f[90] == pytest.approx(min_ratio + (1 - min_ratio) * decay_curve(0.5, shape))
    assert f[total:] == pytest.approx([min_ratio] * 20)


def test_wsd_decay_starts_at_the_branch_step():
    kw = dict(warmup=5, total=130, schedule="wsd_decay", min_ratio=0.0, decay_start=100, decay_shape="linear")
    assert [lr_factor(s, **kw) for s in (50, 99, 100)] == [1.0, 1.0, 1.0]
    assert lr_factor(115, **kw) == pytest.approx(0.5)
    assert lr_factor(130, **kw) == pytest.approx(0.0)
    assert lr_factor(2, **kw) == pytest.approx(3 / 5)  # warmup still applies before it


def test_bad_schedule_keys_are_refused_at_validation(train_cfg):
    with pytest.raises(ValueError, match="optim.decay_shape"):
        validate(train_cfg("optim.schedule=wsd", "optim.decay_shape=exp"))
    with pytest.raises(ValueError, match="optim.decay_fraction"):
        validate(train_cfg("optim.schedule=wsd", "optim.decay_fraction=1.5"))
    with pytest.raises(ValueError, match="cooldown_steps"):
        validate(train_cfg("optim.schedule=wsd_decay", "branch_from=x.ckpt"))
    with pytest.raises(ValueError, match="branch_from"):
        validate(train_cfg("optim.schedule=wsd_decay", "optim.cooldown_steps=5"))
    with pytest.raises(ValueError, match="optim.schedule"):
        validate(train_cfg("optim.schedule=warmup_stable"))


def test_branch_from_a_missing_or_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="branch_from"):
        checkpoint_step(tmp_path / "nope.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "weights.ckpt")
    with pytest.raises(ValueError, match="global_step"):
        checkpoint_step(tmp_path / "weights.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="branch_from: .*junk.ckpt: (refused|not a readable)"):
        checkpoint_step(tmp_path / "junk.ckpt")


COMMON = (
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=1000",
    "trainer.ckpt_every_n_steps=4",
    "optim.warmup_steps=2",
    "optim.min_lr_ratio=0.0",
    "optim.lr=1e-3",
    "+callbacks.samples._target_=llmforge.callbacks.SampleIndexRecorder",
    "callbacks.sample_text=null",
)


def test_cooldown_branch_inherits_optimizer_state_and_data_position(train_cfg, tmp_path):
    main_dir, branch_dir = tmp_path / "main", tmp_path / "branch"
    run(train_cfg(*COMMON, "optim.schedule=wsd", "trainer.max_steps=12", run_dir=main_dir))
    ckpt = main_dir / "checkpoints" / "step0000008.ckpt"
    assert checkpoint_step(ckpt) == 8

    cfg = train_cfg(
        *COMMON,
        f"branch_from={ckpt}",
        "optim.schedule=wsd_decay",
        "optim.cooldown_steps=3",
        "optim.decay_shape=linear",
        run_dir=branch_dir,
    )
    result = run(cfg)
    assert result.global_step == 11  # the branch step + cooldown_steps, whatever trainer.max_steps said
    assert (branch_dir / "checkpoints" / "last.ckpt").is_file()

    lr = {s: v[-1] for s, v in all_scalars(branch_dir / "tb", "train/lr").items()}
    assert sorted(lr) == [8, 9, 10]  # the branch logs its own steps only
    assert [lr[s] for s in (8, 9, 10)] == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
    main_lr = {s: v[-1] for s, v in all_scalars(main_dir / "tb", "train/lr").items()}
    assert main_lr[7] == main_lr[8] == pytest.approx(1e-3)  # stable phase of the main run

    # data position: the branch reads the windows the main run read after the checkpoint
    main_samples = (main_dir / "samples" / "rank0.txt").read_text().splitlines()
    branch_samples = (branch_dir / "samples" / "rank0.txt").read_text().splitlines()
    assert branch_samples == main_samples[8:11]
    # optimizer state: both take step 8 at the peak LR from the same weights, AdamW moments and batch, so
    # the loss after it (step 9) is bitwise the same; with fresh moments it would not be
    main_loss = {s: v[-1] for s, v in all_scalars(main_dir / "tb", "train/loss").items()}
    branch_loss = {s: v[-1] for s, v in all_scalars(branch_dir / "tb", "train/loss").items()}
    assert branch_loss[8] == main_loss[8] and branch_loss[9] == main_loss[9]
    assert branch_loss[10] != main_loss[10]  # step 9 already ran at a lower LR in the branch


def test_sweep_composes_with_branch_keys():
    cfg = compose_train(
        [
            "optim.schedule=wsd_decay",
            "optim.cooldown_steps=7",
            "branch_from=a.ckpt",
            "optim.decay_shape=cosine",
        ]
    )
    assert cfg.optim.cooldown_steps == 7 and cfg.branch_from == "a.ckpt"


@pytest.mark.slow
def test_a_sweep_of_cooldown_branches_from_one_checkpoint(tmp_path, tiny_data):
    base = [
        "model=tiny",
        f"data.path={tiny_data}",
        "data.seq_len=32",
        "data.batch_size=4",
        "trainer.enable_progress_bar=false",
        *COMMON,
    ]
    proc = run_cli(
        "llmforge.train", *base, "optim.schedule=wsd", "trainer.max_steps=8", "name=main", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "runs" / "main" / "checkpoints" / "step0000004.ckpt"
    proc = run_cli(
        "llmforge.train",
        "-m",
        *base,
        f"branch_from={ckpt}",
        "optim.schedule=wsd_decay",
        "optim.cooldown_steps=2,3",
        "name=cool",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "runs" / "cool" / "multirun").glob("[0-9]_*"))  # <job>_<swept overrides>
    assert [j.name for j in jobs] == ["0_optim.cooldown_steps=2", "1_optim.cooldown_steps=3"]
    assert [json.loads((j / "result.json").read_text())["global_step"] for j in jobs] == [6, 7]
    main = (tmp_path / "runs" / "main" / "samples" / "rank0.txt").read_text().splitlines()
    for job, n in zip(jobs, (2, 3), strict=True):
        assert (job / "samples" / "rank0.txt").read_text().splitlines() == main[4 : 4 + n]
        lr = {s: v[-1] for s, v in all_scalars(Path(job) / "tb", "train/lr").items()}
        assert sorted(lr) == list(range(4, 4 + n))
        assert lr[4] == pytest.approx(1e-3) and lr[4 + n - 1] < lr[4]


def test_a_requeued_branch_continues_the_same_decay(train_cfg, tmp_path, monkeypatch):
    """A branch that is interrupted and requeued (SLURM restart; the same with ``resume=auto``) resumes from
    its own last checkpoint, but its decay still starts at ``branch_from``'s step: its LRs and losses are
    those of the branch that ran through."""
    main_dir, whole_dir, again_dir = tmp_path / "main", tmp_path / "whole", tmp_path / "again"
    run(train_cfg(*COMMON, "optim.schedule=wsd", "trainer.max_steps=8", run_dir=main_dir))
    branch = (
        *COMMON,
        f"branch_from={main_dir / 'checkpoints' / 'step0000004.ckpt'}",
        "optim.schedule=wsd_decay",
        "optim.cooldown_steps=6",
        "optim.decay_shape=linear",
    )
    run(train_cfg(*branch, run_dir=whole_dir))  # steps 4..9, a checkpoint at step 8
    (again_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(whole_dir / "checkpoints" / "step0000008.ckpt", again_dir / "checkpoints" / "last.ckpt")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert run(train_cfg(*branch, run_dir=again_dir)).global_step == 10

    def scalars(run_dir: Path, tag: str) -> dict[int, float]:
        return {s: v[-1] for s, v in all_scalars(run_dir / "tb", tag).items()}

    whole_lr, again_lr = scalars(whole_dir, "train/lr"), scalars(again_dir, "train/lr")
    assert [whole_lr[s] for s in range(4, 10)] == pytest.approx([1e-3 * (1 - k / 6) for k in range(6)])
    assert again_lr[8] == whole_lr[8] and again_lr[9] == whole_lr[9]  # a decay from step 8 would differ
    whole_loss, again_loss = scalars(whole_dir, "train/loss"), scalars(again_dir, "train/loss")
    assert again_loss[8] == whole_loss[8] and again_loss[9] == whole_loss[9]
