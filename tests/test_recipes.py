"""The training recipes together (document masking with reset positions, µP, WSD) in every CPU precision,
under both distributed strategies, and as `-m` sweep points composed with the SLURM launcher."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from llmforge.config import validate
from llmforge.curves import read_scalars
from tests.conftest import CONF, compose_train, train_two_processes

# tiny: d_model 64, so µP's width multiplier is 2 and its hidden AdamW group trains at lr / 2
RECIPES = (
    "data.document_mask=true",
    "data.document_positions=reset",
    "model.mup=true",
    "model.mup_base_width=32",
    "optim.schedule=wsd",
)


def hidden_lr_ratios(ckpt: dict) -> list[float]:
    """Each AdamW group's initial LR over the peak LR, from a Lightning checkpoint."""
    groups = ckpt["optimizer_states"][0]["param_groups"]
    peak = max(g["initial_lr"] for g in groups)
    return sorted(g["initial_lr"] / peak for g in groups)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("objective", ["clm", "mlm", "denoise"])
def test_recipes_train_in_bf16(train_cfg, objective, precision):
    from llmforge.training import run

    result = run(
        train_cfg(
            f"objective={objective}",
            f"precision={precision}",
            *RECIPES,
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "callbacks.sample_text=null",
        )
    )
    assert result.global_step == 2
    assert math.isfinite(result.metrics["train/loss"]) and math.isfinite(result.metrics["val/loss"])
    ckpt = torch.load(result.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert hidden_lr_ratios(ckpt) == [0.5, 1.0, 1.0]  # µP's hidden group at lr / width_mult


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "objective"), [("ddp", "mlm"), ("fsdp", "clm"), ("fsdp", "denoise")])
def test_recipes_under_two_process_strategies(tmp_path, tiny_data, strategy, objective):
    name = f"{objective}-{strategy}-recipes"
    run_dir = train_two_processes(
        tmp_path, tiny_data, name, f"objective={objective}", f"strategy={strategy}", *RECIPES, steps=2
    )
    scalars = read_scalars(run_dir)
    assert sorted(dict(scalars["train/loss"])) == [0, 1]
    assert all(math.isfinite(v) for _, v in scalars["train/loss"])
    last = run_dir / "checkpoints" / "last.ckpt"
    if strategy == "ddp":
        assert hidden_lr_ratios(torch.load(last, weights_only=False)) == [0.5, 1.0, 1.0]
    else:
        assert last.is_dir() and any(last.iterdir())  # sharded


def test_recipe_knobs_compose_as_a_sweep_and_with_the_slurm_launcher():
    """Every recipe knob swept as on a `-m` command line: each sweep point composes, validates, and
    composes with ``hydra/launcher=slurm`` (one task per rank, as any run)."""
    sweep = [
        "data.document_mask=true,false",
        "data.document_positions=continue,reset",
        "optim.schedule=wsd,cosine",
        "optim.decay_shape=linear,1-sqrt",
        "model.mup=true,false",
    ]
    parsed = OverridesParser.create().parse_overrides(sweep)
    axes = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    points = list(itertools.product(*axes))
    assert len(points) == 32
    for point in points:
        cfg = compose_train([*point, "model.mup_base_width=32", "run_dir=unused"])
        validate(cfg)
        assert cfg.optim.schedule == point[2].split("=")[1]
        assert cfg.data.document_mask == (point[0].lower() == "data.document_mask=true")
    branch = ["optim.schedule=wsd_decay", "optim.cooldown_steps=50", "branch_from=a.ckpt", *RECIPES[:4]]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hardware.devices=2", *branch],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.tasks_per_node == 2
    assert cfg.branch_from == "a.ckpt" and cfg.model.mup and cfg.data.document_mask
