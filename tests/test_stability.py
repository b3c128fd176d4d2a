"""The stability guard: NaN/Inf and loss spikes, with each policy, on tiny real runs."""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
import torch

from llmforge.callbacks import DivergenceError, StabilityGuard
from llmforge.curves import read_scalars
from llmforge.training import build_callbacks, run
from tests.conftest import run_cli

RECORDER = "+callbacks.samples._target_=llmforge.callbacks.SampleIndexRecorder"


class PoisonLoss(L.Callback):
    """Test harness: the training loss of the given steps is multiplied by ``factor`` (nan: a batch whose
    loss is NaN; a large number: a spike, with gradients as large), on the given ranks only."""

    def __init__(self, steps: list[int], factor: float | str, ranks: list[int] | None = None) -> None:
        self.steps, self.factor, self.ranks = set(steps), float(factor), ranks

    def on_fit_start(self, trainer, pl_module):
        loss = pl_module.loss

        def poisoned(batch):
            value, n, extra = loss(batch)
            hit = pl_module.training and trainer.global_step in self.steps
            if hit and (self.ranks is None or trainer.global_rank in self.ranks):
                value = value * self.factor
            return value, n, extra

        pl_module.loss = poisoned


class CorruptWeights(L.Callback):
    """Test harness: a weight becomes NaN at the start of the given steps (a diverged model, persistent)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            with torch.no_grad():
                weight = pl_module.model.norm.weight  # the final norm: every logit turns NaN
                local = (
                    weight.to_local() if hasattr(weight, "to_local") else weight
                )  # FSDP: this rank's shard
                local.view(-1)[0] = float("nan")


def poison(steps: list[int], factor: str = "nan") -> list[str]:
    return [
        "+callbacks.poison._target_=tests.test_stability.PoisonLoss",
        f"+callbacks.poison.steps=[{','.join(map(str, steps))}]",
        f"+callbacks.poison.factor={factor}",
    ]


def anomalies(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "anomalies.jsonl").read_text().splitlines()]


def batches(run_dir) -> list[list[int]]:
    lines = (run_dir / "samples" / "rank0.txt").read_text().splitlines()
    return [list(map(int, line.split())) for line in lines]


def state(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


def finite(sd: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in sd.values() if t.is_floating_point())


def common(*extra: str) -> tuple[str, ...]:
    return ("debug=fast", "trainer.val_check_interval=100", RECORDER, *extra)


def test_skip_discards_the_nan_step_and_records_its_samples(train_cfg):
    cfg = train_cfg(*common("trainer.max_steps=6", "callbacks.guard.nan_policy=skip", *poison([3])))
    result = run(cfg)
    assert result.global_step == 6
    (record,) = anomalies(result.run_dir)
    assert record["step"] == 3 and record["kind"] == "nan" and record["action"] == "skip"
    assert record["loss"] == "nan"
    assert record["indices"] == batches(result.run_dir)[3]  # the windows of step 3's batch
    ckpt = result.run_dir / "checkpoints"
    before, after = state(ckpt / "step0000003.ckpt"), state(ckpt / "step0000004.ckpt")
    assert all(torch.equal(before[k], after[k]) for k in before)  # step 3 changed nothing
    assert finite(state(result.last_checkpoint))
    assert not torch.equal(after["model.norm.weight"], state(ckpt / "step0000005.ckpt")["model.norm.weight"])
    assert dict(read_scalars(result.run_dir)["guard/anomalies"]) == {3: 1, 4: 1, 5: 1}  # from the first one


def test_warn_applies_the_step_and_records_every_anomaly(train_cfg):
    result = run(train_cfg(*common("trainer.max_steps=5", "callbacks.guard.nan_policy=warn", *poison([2]))))
    assert result.global_step == 5
    records = anomalies(result.run_dir)
    # the NaN gradients of step 2 were applied: the model is NaN from then on
    assert [r["step"] for r in records] == [2, 3, 4] and {r["action"] for r in records} == {"warn"}
    assert not finite(state(result.last_checkpoint))


def test_stop_ends_the_run_with_the_last_good_checkpoint(train_cfg):
    cfg = train_cfg(*common("trainer.max_steps=8", "callbacks.guard.nan_policy=stop", *poison([3])))
    with pytest.raises(DivergenceError, match=r"nan at step 3.*last good checkpoint .*step0000002\.ckpt"):
        run(cfg)
    run_dir = cfg.run_dir
    from pathlib import Path

    ckpt = Path(run_dir) / "checkpoints"
    (record,) = anomalies(Path(run_dir))
    assert record["step"] == 3 and record["action"] == "stop"
    last = torch.load(ckpt / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2  # weights whose loss (step 2) was checked and fine
    good = state(ckpt / "step0000002.ckpt")
    assert all(torch.equal(last["state_dict"][k], good[k]) for k in good) and finite(good)
    assert len(batches(Path(run_dir))) == 4  # nothing trained after step 3
    # the checkpoints of weights whose loss was bad (3) or never checked (4) are set aside, not resumed from
    assert sorted(p.name for p in (ckpt / "suspect").iterdir()) == ["step0000003.ckpt", "step0000004.ckpt"]
    assert sorted(p.name for p in ckpt.glob("step*.ckpt"))[-1] == "step0000002.ckpt"


def test_spike_after_warmup_is_detected_and_skipped(train_cfg):
    cfg = train_cfg(
        "debug=overfit",
        RECORDER,
        "trainer.max_steps=14",
        "callbacks.guard.spike_policy=skip",
        "callbacks.guard.warmup=5",
        "callbacks.guard.window=5",
        "callbacks.guard.zscore=6",
        *poison([3, 11], factor="30"),  # step 3 is inside the warmup: not looked at
    )
    result = run(cfg)
    (record,) = anomalies(result.run_dir)
    assert record["step"] == 11 and record["kind"] == "spike" and record["action"] == "skip"
    assert record["loss"] > record["threshold"] == pytest.approx(record["median"] + 6 * record["scale"])
    assert record["indices"] == batches(result.run_dir)[11]


def test_rollback_reloads_the_last_good_state_then_stops_at_the_cap(train_cfg):
    cfg = train_cfg(
        *common(
            "trainer.max_steps=10",
            "callbacks.guard.nan_policy=rollback",
            "callbacks.guard.max_rollbacks=1",
            "+callbacks.corrupt._target_=tests.test_stability.CorruptWeights",
            "+callbacks.corrupt.steps=[4,7]",
        )
    )
    with pytest.raises(DivergenceError, match=r"nan at step 7.*max_rollbacks=1"):
        run(cfg)
    from pathlib import Path

    run_dir = Path(cfg.run_dir)
    ckpt = run_dir / "checkpoints"
    first, second = anomalies(run_dir)
    assert (first["step"], first["action"]) == (4, "rollback to step0000003.ckpt")
    assert (second["step"], second["action"]) == (7, "stop")
    # step 4 restored W_3 (model and optimizer) and applied nothing: W_5 == W_3, bit for bit
    w3 = torch.load(ckpt / "step0000003.ckpt", weights_only=False)
    w5 = torch.load(ckpt / "step0000005.ckpt", weights_only=False)
    assert finite(w5["state_dict"])
    assert all(torch.equal(w3["state_dict"][k], w5["state_dict"][k]) for k in w3["state_dict"])
    s3, s5 = w3["optimizer_states"][0]["state"], w5["optimizer_states"][0]["state"]
    assert all(torch.equal(s3[i]["exp_avg"], s5[i]["exp_avg"]) for i in s3)
    # the run went on after the rollback (steps 5 and 6 trained), then stopped at the cap
    w6 = state(ckpt / "step0000006.ckpt")
    assert not torch.equal(w5["state_dict"]["model.norm.weight"], w6["model.norm.weight"])
    assert sorted(p.name for p in (ckpt / "suspect").iterdir()) == ["step0000007.ckpt", "step0000008.ckpt"]
    last = torch.load(ckpt / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6 and finite(last["state_dict"])
    assert last["callbacks"]["StabilityGuard"]["rollbacks"] == 1


def test_absurd_learning_rate_ends_with_a_message_and_a_usable_checkpoint(tmp_path, tiny_data):
    proc = run_cli(
        "llmforge.train",
        "model=tiny",
        f"data.path={tiny_data}",
        "data.seq_len=32",
        "data.batch_size=4",
        "trainer.enable_progress_bar=false",
        "trainer.max_steps=40",
        "optim.lr=1e4",
        "name=lr",
        cwd=tmp_path,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "stopped: training stopped: nan at step" in proc.stderr
    assert "last good checkpoint" in proc.stderr and "last.ckpt" in proc.stderr
    run_dir = tmp_path / "runs" / "lr"
    assert anomalies(run_dir)[0]["kind"] == "nan"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert finite(last["state_dict"])  # no NaN, and it loads into the model
    from llmforge.objectives.clm import CausalLM

    module = CausalLM(**last["hyper_parameters"])
    module.load_state_dict(last["state_dict"])
    with torch.no_grad():
        assert math.isfinite(float(module.loss(_batch(module))[0]))


def _batch(module) -> dict:
    ids = torch.randint(5, module.model_cfg.vocab_size - 1, (2, 16))
    return {"input_ids": ids, "labels": ids.roll(-1, dims=1)}


def test_bad_knobs_are_named(train_cfg):
    with pytest.raises(ValueError, match=r"callbacks.guard.nan_policy='explode' is not one of warn, skip"):
        build_callbacks(train_cfg("callbacks.guard.nan_policy=explode"))
    with pytest.raises(ValueError, match=r"callbacks.guard.warmup=50 exceeds callbacks.guard.window=10"):
        StabilityGuard(window=10, warmup=50)


def test_spike_detection_statistics():
    guard = StabilityGuard(window=4, warmup=3, zscore=3.0, factor=2.0)
    assert guard.check(float("inf"))[0] == "nan" and guard.check(float("nan"))[0] == "nan"
    for x in (2.0, 2.2, 1.8):
        assert guard.check(x)[0] is None  # warmup: nothing is a spike yet
        guard.losses.append(x)
    kind, stats = guard.check(2.9)  # median 2, MAD 0.2 -> scale 0.297: z-threshold 2.89 < factor threshold 4
    assert kind == "spike" and stats["threshold"] == pytest.approx(2.0 + 3 * 1.4826 * 0.2)
    assert guard.check(2.8)[0] is None


def descent(steps: int = 100, start: float = 10.0, end: float = 0.005, flat: int = 0) -> list[float]:
    """`flat` steps at `start` (the LR warmup), then a steep geometric descent to `end` (overfitting)."""
    return [
        start if t < flat else start * (end / start) ** ((t - flat) / (steps - 1 - flat))
        for t in range(steps)
    ]


def test_3000x_jump_after_the_initial_descent_is_a_spike():
    losses = descent(flat=10)
    old = np.mean(losses) + 6 * np.std(losses)
    assert old == pytest.approx(22.5, abs=0.1)  # mean + 6 std of this window: the jump below hid under it
    guard = StabilityGuard()  # the defaults: window 100, warmup 20, zscore 6
    for x in losses:
        assert guard.check(x)[0] is None  # nothing in the descent itself is a spike
        guard.losses.append(x)
    kind, stats = guard.check(15.5)
    assert kind == "spike" and stats["threshold"] < 15.5


def test_slow_plateau_is_no_spike():
    rng = np.random.default_rng(0)
    guard = StabilityGuard()
    # descent to a plateau around 3.0 that creeps up slowly (+0.1% a step), with 1% noise
    losses = descent(60, 10.0, 3.0) + [
        3.0 * (1 + 0.001 * t) * (1 + 0.01 * rng.standard_normal()) for t in range(400)
    ]
    flagged = []
    for step, x in enumerate(losses):
        if guard.check(x)[0] is not None:
            flagged.append(step)
        guard.losses.append(x)
    assert flagged == []
    assert guard.check(losses[-1] * 1.5)[0] == "spike"  # and a real jump on that plateau still is


@pytest.mark.slow
def test_ddp_ranks_agree_to_skip_a_nan_on_one_rank(tmp_path, tiny_data):
    proc = run_cli(
        "llmforge.train",
        "strategy=ddp",
        "hardware.devices=2",
        "debug=fast",
        "trainer.max_steps=4",
        "model=tiny",
        f"data.path={tiny_data}",
        "data.seq_len=32",
        "data.batch_size=3",
        "name=ddp",
        "callbacks.guard.nan_policy=skip",
        *poison([2]),
        "+callbacks.poison.ranks=[1]",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "runs" / "ddp"
    (record,) = anomalies(run_dir)
    assert record["step"] == 2 and record["action"] == "skip"
    assert math.isfinite(record["rank_losses"][0]) and record["rank_losses"][1] == "nan"
    assert len(set(record["indices"])) == 6  # both ranks' windows
    assert finite(state(run_dir / "checkpoints" / "last.ckpt"))


@pytest.mark.slow
def test_fsdp_global_grad_norm_and_rollback_to_a_sharded_checkpoint(tmp_path, tiny_data, train_cfg):
    """One 2-rank FSDP run: its step-0 grad norm is the whole model's (the same as one process on the same
    8 samples logs), and a rollback reloads a sharded checkpoint (model and optimizer), or the sharded
    initial weights (the model only)."""
    common = ("debug=fast", "model=tiny", f"data.path={tiny_data}", "data.seq_len=32")
    proc = run_cli(
        "llmforge.train",
        *common,
        "strategy=fsdp",
        "hardware.devices=2",
        "data.batch_size=4",
        "trainer.val_check_interval=100",
        "trainer.max_steps=5",
        "name=fsdp",
        "callbacks.guard.nan_policy=rollback",
        "+callbacks.corrupt._target_=tests.test_stability.CorruptWeights",
        "+callbacks.corrupt.steps=[1,3]",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "runs" / "fsdp"
    first, record = anomalies(run_dir)
    assert (first["step"], first["action"]) == (1, "rollback to step0000000.ckpt")  # weights only
    assert (record["step"], record["action"]) == (3, "rollback to step0000002.ckpt")
    # the step-0 checkpoint holds the weights only, not AdamW's zero moments (1/3 of a full checkpoint)
    from llmforge.checkpoints import holds_training_state, read_dcp_metadata

    step0, step2 = run_dir / "checkpoints" / "step0000000.ckpt", run_dir / "checkpoints" / "step0000002.ckpt"
    assert not holds_training_state(step0) and holds_training_state(step2)
    assert not any(k.startswith("optimizer") for k in read_dcp_metadata(step0).state_dict_metadata)
    size = {p: sum(f.stat().st_size for f in p.iterdir()) for p in (step0, step2)}
    assert size[step0] < 0.5 * size[step2]
    losses = dict(read_scalars(run_dir)["train/loss"])
    assert math.isnan(losses[1]) and math.isnan(losses[3])
    assert all(math.isfinite(losses[s]) for s in (0, 2, 4))
    # step 4 ran on the weights of step 2 again: the same loss as step 2 had on its (other) batch is not
    # expected, but a finite one close to it is
    assert abs(losses[4] - losses[2]) < 0.5
    single = run(train_cfg(*common, "data.batch_size=8", "trainer.max_steps=1", run_dir=tmp_path / "single"))
    reference = dict(read_scalars(single.run_dir)["train/grad_norm"])[0]
    assert dict(read_scalars(run_dir)["train/grad_norm"])[0] == pytest.approx(reference, rel=1e-4)


def test_resume_keeps_the_guard_state(train_cfg, tmp_path):
    args = common("callbacks.guard.nan_policy=skip", *poison([1]))
    run(train_cfg(*args, "trainer.max_steps=3", run_dir=tmp_path / "r"))
    resumed = run(train_cfg(*args, "trainer.max_steps=6", "resume=auto", run_dir=tmp_path / "r"))
    saved = torch.load(resumed.last_checkpoint, weights_only=False)["callbacks"]["StabilityGuard"]
    assert saved["bad_steps"] == [1] and saved["checked_through"] == 5
    assert len(saved["losses"]) == 5  # steps 0, 2, 3, 4, 5: the window goes on across the resume
    assert [r["step"] for r in anomalies(tmp_path / "r")] == [1]


def test_accumulation_records_every_micro_batch_of_the_step(train_cfg):
    args = common(
        "trainer.max_steps=3", "trainer.accumulate_grad_batches=2", "callbacks.guard.nan_policy=skip"
    )
    result = run(train_cfg(*args, *poison([1])))
    (record,) = anomalies(result.run_dir)
    micro = batches(result.run_dir)  # one line per micro-batch: steps 0, 0, 1, 1, 2, 2
    assert record["step"] == 1 and record["indices"] == micro[2] + micro[3]
    assert result.global_step == 3 and finite(state(result.last_checkpoint))


def test_step0_checkpoint_holds_the_initial_weights_only(train_cfg):
    """The guard's step-0 checkpoint: the weights, no optimizer state (its moments would be zeros), so
    it is about the size of the weights; a rollback to it restarts AdamW from an empty state, and a
    resume from it (last.ckpt after a stop) starts at step 0 from those weights."""
    from pathlib import Path

    from llmforge.checkpoints import holds_training_state

    cfg = train_cfg(
        *common(
            "trainer.max_steps=4",
            "callbacks.guard.nan_policy=rollback",
            "callbacks.guard.max_rollbacks=1",
            "+callbacks.corrupt._target_=tests.test_stability.CorruptWeights",
            "+callbacks.corrupt.steps=[1,2]",
        )
    )
    with pytest.raises(DivergenceError, match=r"nan at step 2.*last good checkpoint .*step0000000\.ckpt"):
        run(cfg)
    ckpt = Path(cfg.run_dir) / "checkpoints"
    first, _ = anomalies(Path(cfg.run_dir))
    assert first["action"] == "rollback to step0000000.ckpt"  # the weights-only checkpoint restored
    step0 = torch.load(ckpt / "step0000000.ckpt", weights_only=False)
    assert "optimizer_states" not in step0 and not holds_training_state(ckpt / "step0000000.ckpt")
    weight_bytes = sum(t.numel() * t.element_size() for t in step0["state_dict"].values())
    assert (ckpt / "step0000000.ckpt").stat().st_size < 1.2 * weight_bytes
    assert finite(step0["state_dict"])
    # after the stop last.ckpt is the initial weights: resume=auto starts again from them, at step 0
    resumed = run(train_cfg(*common("trainer.max_steps=2", "resume=auto"), run_dir=Path(cfg.run_dir)))
    assert resumed.global_step == 2 and holds_training_state(resumed.last_checkpoint)
    first_loss = dict(read_scalars(resumed.run_dir)["train/loss"])[0]
    assert math.isfinite(first_loss)
