"""TensorBoard monitoring: the event files of real tiny runs, read back and checked value by value."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from llmforge.callbacks import (
    HPARAM_COLUMNS,
    PEAK_BF16_FLOPS,
    device_peak_flops,
    hparam_columns,
    mfu,
    total_grad_norm,
)
from llmforge.curves import read_scalars
from llmforge.data.datamodule import ShardDataModule
from llmforge.data.shards import read_manifest
from llmforge.objectives.base import lr_factor
from llmforge.training import build_module, run

STEP_TAGS = (
    "train/loss",
    "train/ppl",
    "train/lr",
    "train/grad_norm",
    "perf/tokens_per_s",
    "perf/samples_per_s",
    "perf/step_time_s",
)


def accumulator(run_dir) -> EventAccumulator:
    (events,) = (run_dir / "tb").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def logged_run(tiny_data, tmp_path_factory):
    """6 steps, logged every 2 steps, warmup then cosine decay, validation every 3 steps."""
    from tests.conftest import compose_train

    run_dir = tmp_path_factory.mktemp("monitoring") / "run"
    cfg = compose_train(
        [
            f"data.path={tiny_data}",
            f"run_dir={run_dir}",
            "model=tiny",
            "data.seq_len=32",
            "data.batch_size=4",
            "debug=fast",
            "trainer.max_steps=6",
            "trainer.log_every_n_steps=2",
            "trainer.val_check_interval=3",
            "optim.lr=1e-3",
            "optim.warmup_steps=3",
            "optim.schedule=cosine",
        ]
    )
    run(cfg)
    return cfg, run_dir


def test_every_step_tag_honours_log_every_n_steps(logged_run):
    _, run_dir = logged_run
    scalars = read_scalars(run_dir)
    for tag in STEP_TAGS:
        assert [step for step, _ in scalars[tag]] == [1, 3, 5], tag  # every 2nd of steps 0..5


def test_logged_values_match_their_definitions(logged_run):
    cfg, run_dir = logged_run
    s = {tag: dict(points) for tag, points in read_scalars(run_dir).items()}
    for step, lr in s["train/lr"].items():  # the schedule's value at that step
        expected = 1e-3 * lr_factor(step, warmup=3, total=6, schedule="cosine", min_ratio=0.1)
        assert lr == pytest.approx(expected, rel=1e-6), step
    for step, loss in s["train/loss"].items():
        assert s["train/ppl"][step] == pytest.approx(math.exp(loss), rel=1e-5)
        assert 0 < s["train/grad_norm"][step] < 100
        tokens, samples = s["perf/tokens_per_s"][step], s["perf/samples_per_s"][step]
        assert tokens > 0 and tokens == pytest.approx(samples * cfg.data.seq_len, rel=1e-5)
        assert s["perf/step_time_s"][step] == pytest.approx(4 / samples, rel=1e-5)
    # the first charts TensorBoard shows are not flat zeros: no epoch, no anomaly count without anomalies
    assert "epoch" not in s and "guard/anomalies" not in s
    assert sorted(s["val/loss"]) == [2, 5] and sorted(s["val/ppl"]) == [2, 5]
    for step, loss in s["val/loss"].items():
        assert s["val/ppl"][step] == pytest.approx(math.exp(loss), rel=1e-5)
    # no accelerator peak on a CPU: no MFU at all (not a zero, not a guess), and no device memory
    assert not [t for t in s if t == "perf/mfu" or t.startswith("memory/")]


def test_hyperparameters_and_manifest_are_in_the_events(logged_run):
    cfg, run_dir = logged_run
    acc = accumulator(run_dir)
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["optim.lr"].number_value == pytest.approx(1e-3)
    assert hp["model.name"].string_value == "tiny" and hp["objective.name"].string_value == "clm"
    assert hp["data.batch_size"].number_value == 4 and hp["data.seq_len"].number_value == 32
    assert hp["precision.value"].string_value == "32-true" and hp["strategy.name"].string_value == "auto"
    assert hp["tokens"].number_value == 6 * 4 * 32  # max_steps x global batch x seq_len
    assert hp["model.num_params"].number_value > 100_000
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"val/loss", "train/loss"}
    # the columns people compare, not ~100 keys led by the checkpoint callback's internals
    assert {h.name for h in experiment.hparam_infos} == {*HPARAM_COLUMNS, "model.num_params", "tokens"}
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"log_every_n_steps": 2' in config and str(cfg.data.path) in config  # the rest: as text
    from tensorboard.plugins.custom_scalar import layout_pb2

    raw = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    (category,) = layout_pb2.Layout.FromString(raw).category
    charts = {c.title: list(c.multiline.tag) for c in category.chart}
    assert charts["loss (train, val)"] == ["train/loss", "val/loss"] and "tokens/s" in charts

    text = acc.Tensors("run_manifest/text_summary")[0].tensor_proto.string_val[0].decode()
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["data"]["manifest_sha256"] in text and json.dumps(manifest["git"]["commit"]) in text


def test_hparam_columns_add_what_the_command_line_overrode():
    config = {"model": {"name": "1b", "d_model": 2048}, "optim": {"lr": 3e-4, "warmup_steps": 10}}
    config |= {"callbacks": {"checkpoint": {"save_top_k": -1}}}
    argv = ["model=1b", "optim.warmup_steps=10,100", "+callbacks.checkpoint.save_top_k=1", "-m"]
    columns = hparam_columns(config, argv, {"tokens": 5})
    assert list(columns) == [
        "model.name",
        "optim.lr",
        "tokens",
        "optim.warmup_steps",
        "callbacks.checkpoint.save_top_k",
    ]


def test_grad_norm_is_the_unclipped_norm_recomputed_for_the_first_step(train_cfg):
    cfg = train_cfg("debug=fast", "trainer.max_steps=1", "trainer.gradient_clip_val=0.01")
    result = run(cfg)
    logged = dict(read_scalars(result.run_dir)["train/grad_norm"])[0]

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, read_manifest(cfg.data.path))
    data = ShardDataModule(
        path=cfg.data.path,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        collate_fn=module.collate_fn(),
        num_workers=0,
        seed=cfg.data.seed,
        shuffle=cfg.data.shuffle,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module.loss(batch)[0].backward()
    grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
    expected = float(torch.cat(grads).norm())
    assert expected > 0.01  # so clipping was active: the logged norm is the one before clipping
    assert logged == pytest.approx(expected, rel=1e-5)
    assert float(total_grad_norm(module.parameters())) == pytest.approx(expected, rel=1e-5)


def test_mlm_logs_accuracy_in_training_and_validation(train_cfg):
    result = run(train_cfg("objective=mlm", "debug=fast", "trainer.max_steps=2"))
    s = read_scalars(result.run_dir)
    for tag in ("train/acc", "val/acc", "train/loss", "val/loss", "train/grad_norm"):
        assert tag in s, tag
    assert all(0.0 <= v <= 1.0 for _, v in s["train/acc"] + s["val/acc"])


def test_mfu_formula_and_peaks():
    # 125m decoder at seq_len 2048 (0.88 GFLOPs/token, README table), 8 H100s at 300k tokens/s in total
    assert mfu(0.88e9, 300_000, PEAK_BF16_FLOPS["H100"], 8) == pytest.approx(0.88e9 * 300_000 / (989e12 * 8))
    if not torch.cuda.is_available():
        assert device_peak_flops() is None


@pytest.mark.gpu
def test_gpu_run_logs_mfu_and_memory(train_cfg):
    result = run(train_cfg("debug=fast", "hardware=gpu", "precision=bf16-mixed", "trainer.max_steps=3"))
    s = read_scalars(result.run_dir)
    assert 0 < s["memory/max_allocated_gib"][-1][1] <= s["memory/max_reserved_gib"][-1][1]
    if device_peak_flops() is not None:
        assert all(0 < v < 1 for _, v in s["perf/mfu"])
