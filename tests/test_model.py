"""The transformer: shapes, causality, exact parameter counts, presets, FLOPs, init and RoPE."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from llmforge.models.transformer import (
    Encoder,
    EncoderDecoder,
    Transformer,
    TransformerConfig,
    apply_rope,
    flops_per_token,
    num_params,
    rope_cache,
)

MODEL_CONF = Path(__file__).resolve().parent.parent / "conf" / "model"


def small(**overrides) -> TransformerConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    base.update(overrides)
    return TransformerConfig(**base)


def build(cfg: TransformerConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


CONFIGS = {
    "mha": small(),
    "gqa": small(n_heads=8, n_kv_heads=2),
    "mqa": small(n_heads=4, n_kv_heads=1),
    "tied": small(tie_embeddings=True),
    "tied_gqa": small(n_heads=8, n_kv_heads=4, tie_embeddings=True, n_layers=3),
    "ffn_hidden": small(ffn_hidden=72, d_model=48, n_heads=6),
    "multiple_of": small(d_model=40, n_heads=5, multiple_of=16),
}


# -- shapes and causality --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mha", "gqa", "tied"])
def test_output_shape_and_dtype(name):
    cfg = CONFIGS[name]
    model = build(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (3, 17))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (3, 17, cfg.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_backward_reaches_every_parameter():
    model = build(CONFIGS["gqa"]).train()
    tokens = torch.randint(0, 97, (2, 9))
    model(tokens).float().logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("name", ["mha", "gqa", "mqa", "tied"])
@pytest.mark.parametrize("cut", [1, 7, 15])
def test_causality(name, cut):
    """Changing tokens at positions >= cut never changes the logits at positions < cut."""
    cfg = CONFIGS[name]
    model = build(cfg)
    g = torch.Generator().manual_seed(cut)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    changed = tokens.clone()
    shift = 1 + torch.randint(0, cfg.vocab_size - 1, (2, 16 - cut), generator=g)
    changed[:, cut:] = (tokens[:, cut:] + shift) % cfg.vocab_size
    assert (changed[:, cut:] != tokens[:, cut:]).all()
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :cut], b[:, :cut], atol=1e-6, rtol=0)
    # and the test could fail: the changed positions themselves do see the change
    assert not torch.allclose(a[:, cut:], b[:, cut:], atol=1e-4)


def test_prefix_logits_equal_shorter_sequence():
    """Logits of a prefix do not depend on the sequence length it is run with (RoPE cache slice, mask)."""
    model = build(CONFIGS["gqa"])
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full, prefix = model(tokens), model(tokens[:, :11])
    torch.testing.assert_close(full[:, :11], prefix, atol=1e-5, rtol=0)


def test_sequence_longer_than_max_seq_len_raises():
    model = build(small(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


# -- parameter counts ------------------------------------------------------------------------------
def unique_param_count(module: torch.nn.Module) -> int:
    seen: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        seen[id(p)] = p.numel()
    return sum(seen.values())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_num_params_matches_module(name):
    cfg = CONFIGS[name]
    model = build(cfg)
    assert num_params(cfg) == unique_param_count(model)
    assert num_params(cfg, include_embedding=False) == unique_param_count(model) - model.embed.weight.numel()


def test_tied_embeddings_share_one_tensor():
    model = build(CONFIGS["tied"])
    assert model.head.weight is model.embed.weight
    untied = build(CONFIGS["mha"])
    assert num_params(CONFIGS["mha"]) - num_params(CONFIGS["tied"]) == 97 * 32
    assert unique_param_count(untied) - unique_param_count(model) == 97 * 32


def test_gqa_shrinks_only_the_kv_projection():
    mha, gqa = small(n_heads=8), small(n_heads=8, n_kv_heads=2)
    head_dim = 32 // 8
    # K and V each lose (8 - 2) heads of head_dim columns per layer
    assert num_params(mha) - num_params(gqa) == 2 * 2 * (8 - 2) * head_dim * 32
    assert build(gqa).blocks[0].attn.qkv.weight.shape == (32 + 2 * 2 * head_dim, 32)


def test_num_params_needs_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        num_params(TransformerConfig(vocab_size=None))
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(TransformerConfig(vocab_size=None))


PRESETS = {"125m": 125e6, "350m": 350e6, "1b": 1e9, "3b": 3e9, "7b": 7e9}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_match_their_names_on_meta(preset):
    raw = OmegaConf.to_container(OmegaConf.load(MODEL_CONF / f"{preset}.yaml"), resolve=True)
    cfg = TransformerConfig(**raw)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    count = unique_param_count(model)
    assert count == num_params(cfg)
    target = PRESETS[preset]
    assert abs(count - target) / target < 0.10, f"{preset}: {count / 1e6:.1f}M parameters"


# -- FLOPs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mha", "gqa", "tied"])
def test_flops_per_token(name):
    cfg = CONFIGS[name]
    non_embedding = num_params(cfg, include_embedding=False)
    f512, f1024 = flops_per_token(cfg, 512), flops_per_token(cfg, 1024)
    assert f512 > 6 * non_embedding
    assert f1024 > f512
    # attention grows linearly in the context: 12 * n_layers * d_model per token per position
    assert f1024 - f512 == pytest.approx(12 * cfg.n_layers * cfg.d_model * 512)
    # the output head is a matmul, tied or not
    head = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0  # counted in non_embedding if untied
    assert flops_per_token(cfg, 0) == pytest.approx(6 * (non_embedding + head))


def test_flops_tied_equals_untied():
    """Tying removes parameters, not compute."""
    assert flops_per_token(CONFIGS["tied"], 256) == flops_per_token(CONFIGS["mha"], 256)


# -- initialisation --------------------------------------------------------------------------------
def test_residual_projections_have_smaller_init():
    cfg = small(vocab_size=500, d_model=128, n_heads=4, n_layers=4)
    model = build(cfg)
    residual = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    seen_residual = seen_plain = 0
    for name, p in model.named_parameters():
        if p.dim() < 2:
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        std = p.detach().std().item()
        if name.endswith(("attn.out.weight", "mlp.down.weight")):
            seen_residual += 1
            assert std == pytest.approx(residual, rel=0.1), name
        else:
            seen_plain += 1
            assert std == pytest.approx(cfg.init_std, rel=0.1), name
        assert abs(p.detach().mean().item()) < 0.1 * cfg.init_std, name
    assert seen_residual == 2 * cfg.n_layers
    assert seen_plain == 2 * cfg.n_layers + 2  # qkv, gate_up per block + embed + head


def test_reset_parameters_is_seeded_and_restores_rope():
    cfg = CONFIGS["gqa"]
    a, b = build(cfg, seed=3), build(cfg, seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    cos = a.rope_cos.clone()
    a.rope_cos.zero_()
    a.reset_parameters()
    assert torch.equal(a.rope_cos, cos)


# -- RoPE ------------------------------------------------------------------------------------------
def test_rope_preserves_norms():
    cos, sin = rope_cache(16, 32, 10000.0)
    x = torch.randn(2, 3, 32, 16)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y[:, :, 1:], x[:, :, 1:], atol=1e-3)  # it does rotate
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is the identity


def test_rope_dot_products_depend_only_on_relative_position():
    cos, sin = rope_cache(8, 64, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q.view(1, 1, 1, 8), cos[m : m + 1], sin[m : m + 1]).flatten()
        kn = apply_rope(k.view(1, 1, 1, 8), cos[n : n + 1], sin[n : n + 1]).flatten()
        return float(qm @ kn)

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(10, 10) == pytest.approx(float(q @ k), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


# -- configuration errors --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=100, n_heads=3), "divisible"),
        (dict(d_model=64, n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(d_model=12, n_heads=4), "even"),  # head_dim 3: RoPE needs pairs
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(vocab_size=10, **kwargs)


def test_default_hidden_is_rounded_swiglu_width():
    cfg = small(d_model=96, n_heads=4, multiple_of=64)
    assert cfg.hidden == 256  # int(8 * 96 / 3) = 256
    cfg = small(d_model=104, n_heads=4, multiple_of=64)
    assert cfg.hidden == 320  # int(8 * 104 / 3) = 277, rounded up to a multiple of 64


# -- encoder and encoder-decoder -------------------------------------------------------------------
def build_arch(arch: str, cfg: TransformerConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return {"decoder": Transformer, "encoder": Encoder, "encdec": EncoderDecoder}[arch](cfg).eval()


ENCDEC_CONFIGS = {
    "mha": small(),
    "gqa": small(n_heads=8, n_kv_heads=2),
    "tied": small(tie_embeddings=True),
    "deeper_decoder": small(n_layers=1, n_decoder_layers=3),
    "ffn_hidden": small(ffn_hidden=72, d_model=48, n_heads=6),
}


def test_encoder_has_the_decoders_parameters_and_sees_both_ways():
    cfg = CONFIGS["gqa"]
    enc, dec = build_arch("encoder", cfg), build_arch("decoder", cfg)
    assert [n for n, _ in enc.named_parameters()] == [n for n, _ in dec.named_parameters()]
    assert num_params(cfg, arch="encoder") == num_params(cfg) == unique_param_count(enc)
    tokens = torch.randint(0, 97, (2, 16))
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 97
    with torch.no_grad():
        a, b = enc(tokens), enc(changed)
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-5)  # the first position sees the last one


def test_encoder_positions_select_rows_of_the_full_logits():
    cfg = CONFIGS["mha"]
    enc = build_arch("encoder", cfg)
    tokens = torch.randint(0, 97, (3, 10))
    positions = torch.tensor([0, 7, 11, 29])
    with torch.no_grad():
        full, sparse = enc(tokens), enc(tokens, positions=positions)
    assert sparse.shape == (4, 97)
    torch.testing.assert_close(sparse, full.flatten(0, 1)[positions])


def test_padding_mask_hides_padding():
    """With the mask, padded positions change nothing at the real ones (encoder, and both stacks)."""
    cfg = CONFIGS["gqa"]
    enc, ed = build_arch("encoder", cfg), build_arch("encdec", cfg)
    real = torch.randint(5, 97, (1, 9))
    padded = torch.cat([real, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1).bool()
    dec_in = torch.randint(5, 97, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(enc(padded, mask)[:, :9], enc(real), atol=1e-5, rtol=0)
        assert not torch.allclose(enc(padded)[:, :9], enc(real), atol=1e-5)  # and the mask is what did it
        torch.testing.assert_close(ed(padded, dec_in, mask), ed(real, dec_in), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cut", [1, 5])
def test_encdec_decoder_is_causal_and_reads_the_encoder(cut):
    cfg = ENCDEC_CONFIGS["gqa"]
    model = build_arch("encdec", cfg)
    g = torch.Generator().manual_seed(cut)
    inputs = torch.randint(0, 97, (2, 12), generator=g)
    targets = torch.randint(0, 97, (2, 8), generator=g)
    changed = targets.clone()
    changed[:, cut:] = (changed[:, cut:] + 1) % 97
    with torch.no_grad():
        a, b = model(inputs, targets), model(inputs, changed)
        assert a.shape == (2, 8, 97)
        torch.testing.assert_close(a[:, :cut], b[:, :cut], atol=1e-6, rtol=0)
        assert not torch.allclose(a[:, cut:], b[:, cut:], atol=1e-4)
        other = inputs.clone()
        other[:, -1] = (other[:, -1] + 1) % 97
        assert not torch.allclose(model(other, targets)[:, 0], a[:, 0], atol=1e-5)  # cross-attention


@pytest.mark.parametrize("name", sorted(ENCDEC_CONFIGS))
def test_encdec_num_params_matches_module(name):
    cfg = ENCDEC_CONFIGS[name]
    model = build_arch("encdec", cfg)
    assert len(model.encoder) == cfg.n_layers and len(model.decoder) == cfg.decoder_layers
    assert num_params(cfg, arch="encdec") == unique_param_count(model)
    without = unique_param_count(model) - model.embed.weight.numel()
    assert num_params(cfg, arch="encdec", include_embedding=False) == without
    assert (model.head.weight is model.embed.weight) == cfg.tie_embeddings


def test_encdec_backward_reaches_every_parameter():
    model = build_arch("encdec", ENCDEC_CONFIGS["gqa"]).train()
    model(torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 5))).logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_encdec_residual_init_counts_branches_per_stack():
    cfg = small(vocab_size=500, d_model=128, n_heads=4, n_layers=2, n_decoder_layers=4)
    model = build_arch("encdec", cfg)
    enc_std, dec_std = cfg.init_std / math.sqrt(2 * 2), cfg.init_std / math.sqrt(3 * 4)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        residual = name.endswith(("attn.out.weight", "cross.out.weight", "mlp.down.weight"))
        want = (enc_std if name.startswith("encoder.") else dec_std) if residual else cfg.init_std
        assert p.detach().std().item() == pytest.approx(want, rel=0.15), name


def test_unknown_arch_and_bad_decoder_layers_raise():
    with pytest.raises(ValueError, match="arch"):
        num_params(small(), arch="bert")
    with pytest.raises(ValueError, match="n_decoder_layers"):
        small(n_decoder_layers=0)


ARCH_PRESETS = [(p, a) for p in sorted(PRESETS) for a in ("encoder", "encdec")]


@pytest.mark.parametrize(("preset", "arch"), ARCH_PRESETS)
def test_presets_build_every_architecture_on_meta(preset, arch):
    raw = OmegaConf.to_container(OmegaConf.load(MODEL_CONF / f"{preset}.yaml"), resolve=True)
    cfg = TransformerConfig(**raw)
    with torch.device("meta"):
        model = build_arch(arch, cfg)
    assert all(p.is_meta for p in model.parameters())
    count = unique_param_count(model)
    assert count == num_params(cfg, arch=arch)
    decoder_only = num_params(cfg)
    if arch == "encoder":
        assert count == decoder_only
    else:  # two stacks of the preset's shape (plus cross-attention), one embedding
        assert 1.8 * decoder_only < count < 2.3 * decoder_only


# -- FLOPs against the modules -------------------------------------------------------------------
def counted_flops(run) -> int:
    """Matmul FLOPs of forward + backward as torch counts them (SDPA through its math backend, so its
    matmuls are counted too)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run().float().sum().backward()
    return counter.get_total_flops()


def norm_weights(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.dim() == 1)


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
@pytest.mark.parametrize("name", ["mha", "gqa", "tied"])
def test_flops_per_token_matches_counted_matmuls(arch, name):
    cfg = CONFIGS[name]
    model = build_arch(arch, cfg).train()
    b, s = 2, 12
    tokens = torch.randint(0, 97, (b, s))
    formula = flops_per_token(cfg, s, arch=arch) * b * s
    # the formula also counts 6 FLOPs per norm weight and token (the PaLM convention); torch does not
    assert counted_flops(lambda: model(tokens)) == formula - 6 * norm_weights(model) * b * s
    if arch == "encoder":
        positions = torch.tensor([1, 4, 13, 20, 22])
        sparse = flops_per_token(cfg, s, arch=arch, predicted=5 / b) * b * s  # 5 of b * s positions
        got = counted_flops(lambda: model(tokens, positions=positions))
        assert got == pytest.approx(sparse - 6 * norm_weights(model) * b * s)


@pytest.mark.parametrize("name", ["mha", "gqa", "tied", "deeper_decoder"])
def test_encdec_flops_match_counted_matmuls(name):
    cfg = ENCDEC_CONFIGS[name]
    model = build_arch("encdec", cfg).train()
    b, s, t = 2, 12, 5
    inputs, targets = torch.randint(0, 97, (b, s)), torch.randint(0, 97, (b, t))
    formula = flops_per_token(cfg, s, arch="encdec", target_len=t) * b * s
    norms = norm_weights(model.encoder) + model.encoder_norm.weight.numel()
    norms_dec = norm_weights(model.decoder) + model.norm.weight.numel()
    expected = formula - 6 * b * (norms * s + norms_dec * t)
    assert counted_flops(lambda: model(inputs, targets)) == pytest.approx(expected, rel=1e-12)


# -- attention paths ---------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_explicit_cpu_attention_matches_the_fused_kernel(causal, padded):
    """bf16 on CPU below EXPLICIT_ATTENTION_MAX_LEN: matmul-softmax-matmul; same result as SDPA."""
    from llmforge.models.transformer import EXPLICIT_ATTENTION_MAX_LEN, attend

    assert EXPLICIT_ATTENTION_MAX_LEN >= 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 16, generator=g) for _ in range(3))
    mask = None
    if padded:
        mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
        mask[1, ..., 17:] = False
    exact = attend(q, k, v, mask, causal)  # fp32: the fused kernel
    fused_mask = mask & torch.ones(24, 24, dtype=torch.bool).tril() if (padded and causal) else mask
    fused = F.scaled_dot_product_attention(
        *(t.bfloat16() for t in (q, k, v)), attn_mask=fused_mask, is_causal=causal and not padded
    )
    explicit = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, causal)
    assert explicit.dtype == torch.bfloat16
    err_explicit = (explicit.float() - exact).abs().max()
    err_fused = (fused.float() - exact).abs().max()
    assert err_explicit < 0.03 and err_explicit < 2 * err_fused + 1e-3
