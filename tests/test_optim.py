"""The LR schedule (warmup + cosine/linear/constant) and the weight-decay parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llmforge.models.transformer import Transformer, TransformerConfig
from llmforge.objectives.base import lr_factor, param_groups


def factors(steps, **kwargs) -> list[float]:
    return [lr_factor(s, **kwargs) for s in steps]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_is_linear_and_reaches_one(schedule):
    warmup = 10
    f = factors(range(warmup), warmup=warmup, total=100, schedule=schedule, min_ratio=0.1)
    assert f == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    steps = [b - a for a, b in zip(f, f[1:], strict=False)]
    assert steps == pytest.approx([1 / warmup] * (warmup - 1))
    assert f[-1] == 1.0  # last warmup step is at the peak
    assert 0 < f[0] < f[1]
    assert lr_factor(warmup, warmup=warmup, total=100, schedule=schedule, min_ratio=0.1) == pytest.approx(1.0)


@pytest.mark.parametrize("min_ratio", [0.0, 0.1, 0.5])
def test_cosine(min_ratio):
    kw = dict(warmup=10, total=110, schedule="cosine", min_ratio=min_ratio)
    f = factors(range(10, 111), **kw)
    assert f[0] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(min_ratio)  # step == total
    assert lr_factor(60, **kw) == pytest.approx(min_ratio + (1 - min_ratio) * 0.5)  # halfway
    quarter = 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_factor(35, **kw) == pytest.approx(min_ratio + (1 - min_ratio) * quarter)
    assert all(b <= a + 1e-12 for a, b in zip(f, f[1:], strict=False))  # never increases
    assert lr_factor(500, **kw) == pytest.approx(min_ratio)  # stays at the floor afterwards


@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_linear(min_ratio):
    kw = dict(warmup=0, total=100, schedule="linear", min_ratio=min_ratio)
    f = factors(range(0, 101), **kw)
    assert f[0] == pytest.approx(1.0)
    assert f[100] == pytest.approx(min_ratio)
    assert f[50] == pytest.approx((1 + min_ratio) / 2)
    diffs = [a - b for a, b in zip(f, f[1:], strict=False)]
    assert diffs == pytest.approx([(1 - min_ratio) / 100] * 100)
    assert lr_factor(1000, **kw) == pytest.approx(min_ratio)


def test_constant_stays_one():
    assert factors(range(0, 300), warmup=0, total=100, schedule="constant", min_ratio=0.1) == [1.0] * 300
    assert factors(range(5, 300), warmup=5, total=100, schedule="constant", min_ratio=0.1) == [1.0] * 295


def test_no_decay_horizon_means_constant_after_warmup():
    """total <= warmup (e.g. no max_steps): warm up, then hold the peak."""
    assert factors(range(3, 50), warmup=3, total=0, schedule="cosine", min_ratio=0.1) == [1.0] * 47


def test_unknown_schedule():
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(50, warmup=10, total=100, schedule="exponential", min_ratio=0.1)


def test_schedule_drives_lambda_lr():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    kw = dict(warmup=4, total=20, schedule="cosine", min_ratio=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, **kw))
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * lr_factor(s, **kw) for s in range(25)])
    assert seen[0] == pytest.approx(0.5) and seen[3] == pytest.approx(2.0) and seen[20] == pytest.approx(0.2)


# -- parameter groups ------------------------------------------------------------------------------
def tiny(tie: bool = False) -> Transformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, tie_embeddings=tie)
    return Transformer(cfg)


def ids(params) -> set[int]:
    return {id(p) for p in params}


@pytest.mark.parametrize("tie", [False, True])
def test_param_groups_split(tie):
    model = tiny(tie)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0

    named = dict(model.named_parameters())
    matmuls = ("qkv.weight", "out.weight", "gate_up.weight", "down.weight")
    expect_decay = {n for n in named if n.endswith(matmuls)}
    expect_no_decay = {n for n in named if n.endswith("norm.weight")} | {"embed.weight"}
    if not tie:
        expect_decay.add("head.weight")
    assert expect_decay | expect_no_decay == set(named)
    assert ids(decay["params"]) == {id(named[n]) for n in expect_decay}
    assert ids(no_decay["params"]) == {id(named[n]) for n in expect_no_decay}
    assert len(expect_no_decay) == 2 * 2 + 2  # two norms per block, final norm, embedding
    assert id(model.embed.weight) in ids(no_decay["params"])
    assert id(model.blocks[0].attn_norm.weight) in ids(no_decay["params"])
    assert id(model.blocks[1].mlp.down.weight) in ids(decay["params"])


def test_param_groups_tied_counted_once():
    model = tiny(tie=True)
    groups = param_groups(model, 0.1)
    flat = [p for g in groups for p in g["params"]]
    assert len(flat) == len(ids(flat)) == len(list(model.parameters()))
    assert sum(p.numel() for p in flat) == sum(p.numel() for p in model.parameters())
    assert sum(p is model.head.weight for p in flat) == 1
    torch.optim.AdamW(groups, lr=1e-3)  # refuses parameters listed twice


def test_param_groups_biases_and_frozen():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4, bias=True), nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.05)
    assert ids(decay["params"]) == set()
    assert ids(no_decay["params"]) == {
        id(model[0].weight),
        id(model[1].bias),
        id(model[2].weight),
        id(model[2].bias),
    }
    model[1].weight.requires_grad_(True)
    decay, _ = param_groups(model, 0.05)
    assert ids(decay["params"]) == {id(model[1].weight)}
