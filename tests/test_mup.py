"""µP (``model.mup``): equal to the standard parameterisation at the base width, the init and LR scaling
rules, and the coordinate check of the µP paper: activations after a few Adam steps keep their scale as the
width grows under µP, and blow up without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmforge.models.transformer import (
    Attention,
    CrossAttention,
    Encoder,
    EncoderDecoder,
    SwiGLU,
    Transformer,
    TransformerConfig,
)
from llmforge.objectives.base import param_groups

VOCAB = 128


def cfg(width: int, mup: bool, base: int = 64, **kw) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=VOCAB,
        d_model=width,
        n_layers=2,
        n_heads=4,
        max_seq_len=64,
        mup=mup,
        mup_base_width=base,
        **kw,
    )


def run(cls, c: TransformerConfig, x: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)
    model = cls(c)
    if cls is EncoderDecoder:
        return model, model(x, x[:, :12])
    return model, model(x)


@pytest.mark.parametrize("cls", [Transformer, Encoder, EncoderDecoder])
def test_mup_at_the_base_width_is_the_standard_parameterisation(cls):
    x = torch.randint(0, VOCAB, (2, 16))
    sp, out_sp = run(cls, cfg(64, False), x)
    mup, out_mup = run(cls, cfg(64, True), x)
    assert all(torch.equal(a, b) for a, b in zip(sp.parameters(), mup.parameters(), strict=True))
    assert torch.equal(out_sp, out_mup)
    assert [g["lr"] if "lr" in g else None for g in param_groups(mup, 0.1, 1e-3, 1.0)] == [None, None]


@pytest.mark.parametrize("cls", [Transformer, Encoder, EncoderDecoder])
def test_mup_init_and_learning_rates_scale_with_width(cls):
    base, wide = cls(cfg(64, True)), cls(cfg(256, True))  # width_mult 4
    assert wide.cfg.width_mult == 4.0 and wide.cfg.attention_scale == pytest.approx((64 * 4) ** -0.5)
    named = dict(wide.named_parameters())
    hidden = {
        n for n, p in named.items() if p.dim() >= 2 and n.split(".")[0] in ("blocks", "encoder", "decoder")
    }
    assert hidden and {"embed.weight", "head.weight"}.isdisjoint(hidden)
    for name in hidden:  # std / sqrt(m), the residual projections' smaller std included
        ratio = (named[name].std() / dict(base.named_parameters())[name].std()).item()
        assert ratio == pytest.approx(0.5, rel=0.1), name
    assert named["embed.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert named["head.weight"].std().item() == pytest.approx(0.02, rel=0.05)

    groups = param_groups(wide, 0.1, 1e-3, wide.cfg.width_mult)
    assert len(groups) == 3
    hidden_group = [g for g in groups if g.get("lr") == pytest.approx(2.5e-4)]
    assert len(hidden_group) == 1 and hidden_group[0]["weight_decay"] == 0.1
    by_id = {id(p): n for n, p in named.items()}
    assert {by_id[id(p)] for p in hidden_group[0]["params"]} == hidden
    assert sum(len(g["params"]) for g in groups) == len(named)
    torch.optim.AdamW(groups, lr=1e-3)  # every parameter once


def coordinates(cls, width: int, mup: bool, steps: int = 6, lr: float = 3e-3) -> dict[str, float]:
    """Mean |coordinate| of every attention, cross-attention and MLP output and of the logits after
    `steps` AdamW steps on a fixed random batch (the µP paper's coordinate check)."""
    c = cfg(width, mup)
    torch.manual_seed(0)
    model = cls(c)
    opt = torch.optim.AdamW(param_groups(model, 0.0, lr, c.width_mult), lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, VOCAB, (8, 32), generator=g), torch.randint(0, VOCAB, (8, 32), generator=g)
    acts: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention | CrossAttention | SwiGLU):
            module.register_forward_hook(
                lambda m, i, o, name=name: acts.__setitem__(name, o.abs().mean().item())
            )
    for step in range(steps + 1):
        logits = model(x, x) if cls is EncoderDecoder else model(x)
        acts["logits"] = logits.abs().mean().item()
        if step < steps:
            F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
            opt.step()
            opt.zero_grad()
    return acts


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: faster, and steady on a loaded machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("cls", [Transformer, Encoder, EncoderDecoder])
def test_coordinate_check(cls, one_thread):
    """A 4x wider model: under µP every layer's output and the logits keep their scale (measured: within
    0.65-1.02x); without µP some layer's output grows several-fold (measured: 9.6x decoder, 9.6x
    encoder, 125x encoder-decoder)."""
    for mup in (True, False):
        narrow, wide = coordinates(cls, 64, mup), coordinates(cls, 256, mup)
        growth = {k: wide[k] / narrow[k] for k in narrow}
        if mup:
            assert all(0.5 < g < 1.5 for g in growth.values()), growth
        else:
            assert max(growth.values()) > 4.0, growth


def test_a_wide_mup_model_is_not_exported_as_llama(tmp_path):
    from llmforge.hf import to_hf

    with pytest.raises(ValueError, match="µP"):
        to_hf(Transformer(cfg(128, True)), None, tmp_path / "hf")


def test_mup_keys_compose_in_a_sweep():
    from tests.conftest import compose_train

    cfg_ = compose_train(["model.mup=true", "model.mup_base_width=64", "model.d_model=128"])
    assert cfg_.model.mup is True and TransformerConfig(**{**cfg_.model, "vocab_size": 8}).width_mult == 2.0
