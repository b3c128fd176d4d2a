"""End-to-end training on CPU with a real Lightning Trainer, real Hydra configs, real TensorBoard files."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from llmforge.curves import plot, read_scalars
from llmforge.training import run
from tests.conftest import PRECISIONS, run_cli
from tests.test_resume import all_scalars


def losses(run_dir) -> dict[int, float]:
    return dict(read_scalars(run_dir)["train/loss"])


PRECISION_CASES = [
    *PRECISIONS,
    pytest.param("bf16-mixed", "gpu", marks=pytest.mark.gpu),
    pytest.param("32-true", "gpu", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize(("precision", "hardware"), PRECISION_CASES)
def test_loss_falls_on_repeated_batch(train_cfg, precision, hardware):
    cfg = train_cfg(
        "debug=overfit",
        f"precision={precision}",
        f"hardware={hardware}",
        "trainer.max_steps=25",
        "model.d_model=128",
    )
    result = run(cfg)
    curve = losses(result.run_dir)
    first, last = curve[min(curve)], curve[max(curve)]
    assert last < 0.5 * first, (precision, first, last)


def test_run_dir_holds_everything(train_cfg):
    result = run(train_cfg("debug=fast", "trainer.max_steps=3", "trainer.ckpt_every_n_steps=2"))
    d = result.run_dir
    assert result.global_step == 3
    saved = OmegaConf.load(d / "config.yaml")
    assert saved.model.name == "tiny" and saved.trainer.max_steps == 3 and saved.run_dir == str(d)
    manifest = json.loads((d / "run_manifest.json").read_text())
    assert manifest["data"]["manifest_sha256"] and manifest["versions"]["torch"] == torch.__version__
    assert "commit" in manifest["git"]
    assert list((d / "tb").glob("events.out.tfevents.*"))
    scalars = read_scalars(d)
    assert {"train/loss", "train/lr", "train/ppl", "val/loss", "val/ppl"} <= set(scalars)
    ckpts = sorted(p.name for p in (d / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step0000000.ckpt", "step0000002.ckpt", "step0000003.ckpt"]  # 0: guard
    ck = torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["global_step"] == 3
    assert ck["ShardDataModule"]["cursor"] == 3 * 4  # 3 steps x batch 4 x 1 rank
    assert plot(d).stat().st_size > 10_000


def test_existing_run_is_not_overwritten(train_cfg, tmp_path):
    run(train_cfg("debug=fast", run_dir=tmp_path / "r"))
    with pytest.raises(FileExistsError, match="resume=auto"):
        run(train_cfg("debug=fast", run_dir=tmp_path / "r"))


def test_resume_continues_with_same_loss_lr_and_data(train_cfg, tmp_path):
    common = (
        "debug=fast",
        "optim.decay_steps=8",
        "optim.warmup_steps=2",
        "trainer.val_check_interval=100",
        "+callbacks.samples._target_=llmforge.callbacks.SampleIndexRecorder",
    )
    full = run(train_cfg(*common, "trainer.max_steps=8", run_dir=tmp_path / "full"))
    run(train_cfg(*common, "trainer.max_steps=4", run_dir=tmp_path / "split"))
    resumed = run(train_cfg(*common, "trainer.max_steps=8", "resume=auto", run_dir=tmp_path / "split"))
    assert resumed.global_step == 8
    a, b = read_scalars(full.run_dir), read_scalars(resumed.run_dir)
    for tag in ("train/loss", "train/lr"):
        assert dict(a[tag]) == pytest.approx(dict(b[tag]), rel=1e-6, abs=0), tag
    assert len(dict(b["train/loss"])) == 8
    seen_full = (full.run_dir / "samples" / "rank0.txt").read_text().splitlines()
    seen_split = (resumed.run_dir / "samples" / "rank0.txt").read_text().splitlines()
    assert seen_full == seen_split and len(seen_full) == 8
    final_a = torch.load(full.last_checkpoint, weights_only=False)["state_dict"]
    final_b = torch.load(resumed.last_checkpoint, weights_only=False)["state_dict"]
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, tiny_data):
    proc = run_cli(
        "llmforge.train",
        "debug=fast",
        "model=tiny",
        f"data.path={tiny_data}",
        "data.seq_len=32",
        "name=cli",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint" in proc.stdout and (tmp_path / "runs" / "cli" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_ddp_two_processes_see_disjoint_data(ddp_run):
    run_dir = ddp_run.run_dir  # 4 steps, batches of 2 per rank (tests/conftest.py)
    ranks = [
        [
            set(map(int, line.split()))
            for line in (run_dir / "samples" / f"rank{r}.txt").read_text().splitlines()
        ]
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 4
    all0, all1 = set().union(*ranks[0]), set().union(*ranks[1])
    assert len(all0) == len(all1) == 8 and not all0 & all1
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["ShardDataModule"]["cursor"] == 4 * 2 * 2
    assert "train/loss" in read_scalars(run_dir)


@pytest.mark.slow
def test_fsdp_two_processes_train_save_and_resume(fsdp_run):
    """2 steps, then ``resume=auto`` to 4 from the sharded checkpoint (tests/conftest.py `fsdp_run`)."""
    ckpts = fsdp_run.run_dir / "checkpoints"
    for name in ("step0000002.ckpt", "last.ckpt"):  # the first run's last, and the second's
        assert (ckpts / name).is_dir() and any((ckpts / name).iterdir())  # sharded: per-rank files
    steps = dict(read_scalars(fsdp_run.run_dir)["train/loss"])
    assert sorted(steps) == [0, 1, 2, 3]
    # resumed, not restarted: each step was logged once, across both runs' event files
    logged = all_scalars(fsdp_run.run_dir, "train/loss")
    assert {step: len(values) for step, values in logged.items()} == dict.fromkeys(range(4), 1)


def test_gradient_accumulation_advances_cursor_per_micro_batch(train_cfg):
    result = run(
        train_cfg(
            "debug=fast",
            "trainer.max_steps=3",
            "trainer.accumulate_grad_batches=2",
            "+callbacks.samples._target_=llmforge.callbacks.SampleIndexRecorder",
        )
    )
    assert result.global_step == 3
    batches = (result.run_dir / "samples" / "rank0.txt").read_text().splitlines()
    assert len(batches) == 6  # two micro-batches per optimizer step
    ck = torch.load(result.last_checkpoint, weights_only=False)
    assert ck["ShardDataModule"]["cursor"] == 3 * 2 * 4
