"""llmforge.estimate against published figures, hand-computed memory and PyTorch's own saved tensors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llmforge.estimate import (
    DEFAULT_GPUS,
    activation_bytes_per_token,
    compute_optimal_tokens,
    estimate,
    logits_bytes_per_token,
    memory_per_gpu,
    recommend,
    training_flops,
)
from llmforge.estimate.__main__ import main
from llmforge.models.transformer import Block, Transformer, TransformerConfig, num_params
from tests.conftest import ROOT, run_cli

# GPT-3 175B (Brown et al. 2020, table 2.1): 96 layers, d_model 12288, 96 heads, FFN 4 * d_model, vocab
# 50257, tied embeddings. A SwiGLU width of 2/3 * 4 * d_model has the same parameters as the 4x GELU MLP.
GPT3 = dict(
    name="gpt3",
    vocab_size=50257,
    d_model=12288,
    n_layers=96,
    n_heads=96,
    ffn_hidden=32768,
    tie_embeddings=True,
    max_seq_len=2048,
)
# Llama-2-70B (Touvron et al. 2023): 80 layers, d_model 8192, 64 heads, 8 KV heads, FFN 28672.
LLAMA2_70B = dict(
    name="llama2-70b", vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672
)


# -- published figures ----------------------------------------------------------------------------------
def test_gpt3_flops():
    assert training_flops(175e9, 300e9) == pytest.approx(3.15e23)
    e = estimate(GPT3, tokens=300e9)
    assert e.params == pytest.approx(175e9, rel=0.01)  # GPT-3 also has biases and position embeddings
    assert e.total_flops_6nd == pytest.approx(3.15e23, rel=0.01)
    # PaLM's count adds attention (12 * layers * d_model * seq_len per token): a few percent at 2048
    assert 1.01 < e.total_flops / e.total_flops_6nd < 1.06


def test_chinchilla_compute_optimal_tokens():
    assert compute_optimal_tokens(70e9) == pytest.approx(1.4e12)
    e = estimate(LLAMA2_70B, tokens=None)
    assert e.params == pytest.approx(68.98e9, rel=0.001)  # Llama-2-70B's published count
    assert e.tokens == e.compute_optimal_tokens == pytest.approx(1.4e12, rel=0.02)
    assert e.tokens_per_param == pytest.approx(20.0)


def test_llama2_7b_params_and_gpu_hours():
    e = estimate("7b", tokens=2e12, gpu="a100", mfu=0.4)
    assert e.params == 6_738_415_616  # Llama-2-7B's config: the Hugging Face checkpoint's count
    # Touvron et al. 2023 report 184,320 A100-80GB hours for the 2T-token run: the MFU this implies,
    # from our FLOP count, should be that of a well-tuned large run (~40-55%)
    implied = e.total_flops / (184_320 * 3600 * 312e12)
    assert 0.35 < implied < 0.6, implied
    assert e.gpu_hours["a100"] == pytest.approx(e.total_flops / (312e12 * 0.4) / 3600)
    assert e.gpu_hours["h100"] == pytest.approx(e.gpu_hours["a100"] * 312 / 989)
    assert e.days == pytest.approx(e.gpu_hours["a100"] / 8 / 24)


def test_money_from_the_price_table_and_overrides():
    e = estimate("1b", tokens=20e9, gpu="a100")
    assert e.cost["a100"]["aws"] == pytest.approx(e.gpu_hours["a100"] * 4.00)
    assert e.cost["a100"]["lambda"] == pytest.approx(e.gpu_hours["a100"] * 1.10)
    assert e.cost["h100"] == {}  # no default H100 price
    e = estimate("1b", tokens=20e9, gpu="h100", prices={"h100": {"mine": 2.0, "other": None}})
    assert e.cost == {"a100": {}, "h100": {"mine": pytest.approx(2.0 * e.gpu_hours["h100"])}, "h200": {}}
    assert e.notes == []


def test_default_mfu_is_the_measured_one_per_gpu_type_and_precision(monkeypatch, capsys):
    from llmforge.estimate import FALLBACK_MFU, MEASURED_MFU

    plain = estimate("1b", tokens=20e9, gpu="h200")  # nothing measured: the fallback, said so
    assert plain.mfu == FALLBACK_MFU and plain.mfu_source.startswith("assumed")
    monkeypatch.setitem(MEASURED_MFU, "h200", {"bf16-mixed": 0.5, "fp8-mixed": 0.625})
    e = estimate("1b", tokens=20e9, gpu="h200")
    assert e.mfu == 0.5 and e.mfu_source.startswith("measured on h200 at bf16-mixed")
    assert e.gpu_hours["h200"] == pytest.approx(e.total_flops / (989e12 * 0.5) / 3600)
    assert e.gpu_hours["h200"] == pytest.approx(plain.gpu_hours["h200"] * FALLBACK_MFU / 0.5)
    assert e.mfu_by_gpu == {"a100": FALLBACK_MFU, "h100": FALLBACK_MFU, "h200": 0.5}  # per GPU type
    assert e.gpu_hours["h100"] == pytest.approx(plain.gpu_hours["h100"])
    fp8 = estimate("1b", tokens=20e9, gpu="h200", precision="fp8-mixed")
    assert fp8.mfu == 0.625 and fp8.memory == e.memory  # fp8-mixed holds what bf16-mixed holds
    assert estimate("1b", tokens=20e9, gpu="h200", precision="bf16-true").mfu == FALLBACK_MFU
    given = estimate("1b", tokens=20e9, gpu="h200", mfu=0.3)
    assert given.mfu_by_gpu == {"a100": 0.3, "h100": 0.3, "h200": 0.3} and given.mfu_source == "given"
    assert main(["model=1b", "gpu=h200"]) == 0  # conf/estimate.yaml's mfu: null -> the measured one
    out = capsys.readouterr().out
    assert "compute at MFU 50% of the bf16 dense peak (measured on h200" in out and "(MFU 40%)" in out
    assert main(["model=1b", "gpu=h200", "mfu=0.45", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mfu_by_gpu"]["h200"] == 0.45


def test_gpu_table_agrees_with_the_mfu_callback():
    from llmforge.callbacks import PEAK_BF16_FLOPS

    for name, spec in DEFAULT_GPUS.items():
        assert spec["peak_tflops"] * 1e12 == PEAK_BF16_FLOPS[name.upper()]


# -- memory -----------------------------------------------------------------------------------------------
def test_memory_by_hand_7b_bf16_mixed():
    """Every term of the 7b estimate, computed by hand (module docstring's formulas)."""
    n, h, f, a, v, L, s = 6_738_415_616, 4096, 11008, 32, 32000, 32, 4096
    cfg = TransformerConfig(name="7b", vocab_size=v, d_model=h, n_layers=L, n_heads=a, ffn_hidden=f)
    per_layer = 2 * (8 * h + 4 * f) + 4 * (4 * h + 2 + a)  # MHA: v = h + 2k = 3h
    assert per_layer == 219_272
    assert activation_bytes_per_token(cfg, "bf16-mixed") == per_layer
    logits = v * (12 + 2) + 8 * h + 2 * h  # log-probs, their and the logits' gradients, its bf16 cast
    kw = dict(strategy="ddp", num_gpus=8, precision="bf16-mixed", seq_len=s, batch_size=1)
    ddp = memory_per_gpu(
        cfg, activation_checkpointing=False, objective={"name": "clm", "fused_ce": False}, **kw
    )  # the plain head
    assert (ddp.weights, ddp.working_copy, ddp.grads, ddp.optimizer, ddp.comm) == (
        4 * n,
        2 * n,
        4 * n,
        8 * n,
        4 * n,
    )
    assert ddp.activations == L * per_layer * s
    assert ddp.logits == logits * s
    assert ddp.total == 22 * n + L * per_layer * s + logits * s
    assert ddp.total / 1e9 == pytest.approx(179.0, abs=0.1)
    # the chunked head (objective.fused_ce, the default): per token the norm's fp32 tensors and three
    # bf16 vectors (input, its gradient, the scaled copy); the head's fp32 gradient, one chunk's product,
    # its fp32 copy and the weight's bf16 copy; one chunk of 1024 tokens (4096 x 4096 / 32000 -> a power
    # of two) x vocabulary: fp32 logits, log-sum-exp's temporary, the bf16 matmul output
    fused = memory_per_gpu(cfg, activation_checkpointing=False, **kw)
    assert fused.logits == s * (8 * h + 3 * 2 * h) + v * h * (4 + 4 + 2 + 2) + 1024 * v * (4 + 4 + 2)
    assert fused.total == 22 * n + L * per_layer * s + fused.logits
    # one sequence of 4096: the head's weight-sized buffers (12 bytes an entry) outweigh the saved logits
    assert fused.logits > ddp.logits
    fsdp = memory_per_gpu(
        cfg,
        strategy="fsdp",
        num_gpus=8,
        precision="bf16-mixed",
        seq_len=s,
        batch_size=1,
        activation_checkpointing=True,
    )
    block = 4 * h * h + 3 * h * f + 2 * h
    root = 2 * v * h + h
    assert block * L + root == n
    assert fsdp.weights == 4 * n / 8 and fsdp.optimizer == 8 * n / 8 and fsdp.working_copy == 0
    assert root > block and fsdp.comm == (root + 2 * block) * 2 + root * 4  # the largest unit's grads
    assert fsdp.activations == L * h * 4 * s + per_layer * s  # fp32 block inputs + one recomputed block
    assert fsdp.total < ddp.total / 5


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_memory_orderings(precision):
    cfg = TransformerConfig(
        name="1b", vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, ffn_hidden=5632
    )
    kw = dict(precision=precision, seq_len=2048, batch_size=4)
    for gpus in (2, 8):
        ddp = memory_per_gpu(cfg, strategy="ddp", num_gpus=gpus, activation_checkpointing=False, **kw)
        fsdp = memory_per_gpu(cfg, strategy="fsdp", num_gpus=gpus, activation_checkpointing=False, **kw)
        ckpt = memory_per_gpu(cfg, strategy="fsdp", num_gpus=gpus, activation_checkpointing=True, **kw)
        assert ckpt.total < fsdp.total < ddp.total
    one_ddp = memory_per_gpu(cfg, strategy="ddp", num_gpus=1, activation_checkpointing=False, **kw)
    one_fsdp = memory_per_gpu(cfg, strategy="fsdp", num_gpus=1, activation_checkpointing=False, **kw)
    assert one_ddp.comm == one_fsdp.comm == 0  # one GPU: no buckets, nothing sharded
    states = {"32-true": 16, "bf16-mixed": 18, "bf16-true": 8}[precision]
    assert one_ddp.weights + one_ddp.working_copy + one_ddp.grads + one_ddp.optimizer == states * num_params(
        cfg
    )


def test_short_sequences_peak_at_the_optimizer_step():
    """Little activation memory: the peak is the AdamW step (foreach's sqrt(v) temporary on top)."""
    cfg = TransformerConfig(name="1b", vocab_size=32000, d_model=2048, n_layers=16, n_heads=16)
    n = num_params(cfg)
    kw = dict(precision="bf16-mixed", seq_len=128, batch_size=1, activation_checkpointing=False)
    kw |= dict(objective={"name": "clm", "fused_ce": False})  # the chunked head's buffers are weight-sized
    ddp = memory_per_gpu(cfg, strategy="ddp", num_gpus=2, **kw)
    assert ddp.peak == "optimizer step" and ddp.total == (4 + 4 + 8 + 4 + 4) * n
    fsdp = memory_per_gpu(cfg, strategy="fsdp", num_gpus=2, **kw)
    assert fsdp.peak == "optimizer step" and fsdp.total == (4 + 4 + 8 + 4) * n / 2
    long = memory_per_gpu(cfg, strategy="ddp", num_gpus=2, **{**kw, "seq_len": 2048, "batch_size": 8})
    assert long.peak == "backward" and long.total > ddp.total
    for m in (ddp, fsdp, long):  # the breakdown of the peak moment adds up
        assert sum(m.parts.values()) == pytest.approx(m.total)
    assert set(ddp.parts) == {"weights", "grads", "optimizer", "step_temp", "comm"}
    assert "activations" in long.parts and "step_temp" not in long.parts


def saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while running fn (parameters, buffers excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def storages(*tensors: torch.Tensor) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_activation_formula_matches_what_autograd_saves(precision, kv_heads):
    """The per-block formula against the tensors PyTorch keeps for the backward (fused CPU attention:
    sequence > 256, the explicit path's limit)."""
    cfg = TransformerConfig(
        vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, max_seq_len=512
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    b, s = 2, 300
    cos, sin = model.rope(s)
    x = torch.randn(b, s, cfg.d_model, requires_grad=True)
    block: Block = model.blocks[0]
    exclude = storages(*model.parameters(), model.rope_cos, model.rope_sin)
    # autocast's bf16 copies of the weights and of the RoPE tables are not activations
    autocast = precision == "bf16-mixed"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        measured = saved_bytes(lambda: block(x, cos, sin, True), exclude)
    if autocast:
        weights = sum(p.numel() for p in block.parameters() if p.dim() == 2) * 2
        measured -= weights + 2 * s * cfg.head_dim * 2
    assert measured == activation_bytes_per_token(cfg, precision) * b * s


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_cross_attention_formula_matches_what_autograd_saves(precision, kv_heads):
    """An encoder-decoder's decoder block: its self-attention block's share plus cross-attention's, per
    decoder token and per encoder token."""
    from llmforge.estimate import cross_attention_bytes
    from llmforge.models.transformer import EncoderDecoder

    cfg = TransformerConfig(
        vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, max_seq_len=512
    )
    torch.manual_seed(0)
    model = EncoderDecoder(cfg)
    b, s, t = 2, 300, 280
    cos, sin = model.rope(t)
    x = torch.randn(b, t, cfg.d_model, requires_grad=True)
    memory = torch.randn(b, s, cfg.d_model, requires_grad=True)  # the encoder output: counted once, apart
    block = model.decoder[0]
    exclude = storages(*model.parameters(), model.rope_cos, model.rope_sin, memory)
    autocast = precision == "bf16-mixed"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        measured = saved_bytes(lambda: block(x, memory, cos, sin), exclude)
    if autocast:
        measured -= sum(p.numel() for p in block.parameters() if p.dim() == 2) * 2 + 2 * t * cfg.head_dim * 2
    per_target, per_memory = cross_attention_bytes(cfg, precision)
    assert measured == (activation_bytes_per_token(cfg, precision) + per_target) * b * t + per_memory * b * s


def test_objectives_flops_params_and_lengths():
    """The README's table (vocabulary 32000, seq_len 2048) and span corruption's lengths at 512."""
    from llmforge.estimate import Objective

    assert Objective("denoise").lengths(512) == (462, 104)  # 77 noise tokens in 26 spans
    table = {"125m": (0.88, 0.76, 0.92, 247.4e6), "7b": (42.9, 42.2, 53.3, 15.36e9)}
    for name, (clm, mlm, denoise, encdec_params) in table.items():
        got = [
            estimate(name, objective=o, seq_len=2048).flops_per_token / 1e9 for o in ("clm", "mlm", "denoise")
        ]
        assert got == pytest.approx([clm, mlm, denoise], abs=0.06)
        assert estimate(name, objective="denoise").params == pytest.approx(encdec_params, rel=1e-3)
    cfg = TransformerConfig(name="x", vocab_size=32000, d_model=768, n_layers=12, n_heads=12)
    kw = dict(strategy="ddp", num_gpus=1, precision="bf16-mixed", seq_len=1024, batch_size=2)
    plain = {"fused_ce": False}  # the plain head: logits memory in proportion to the predicted positions
    clm = memory_per_gpu(cfg, activation_checkpointing=False, objective={"name": "clm", **plain}, **kw)
    mlm = memory_per_gpu(
        cfg, activation_checkpointing=False, objective={"name": "mlm", "mask_prob": 0.25, **plain}, **kw
    )
    assert mlm.activations == clm.activations and mlm.logits == pytest.approx(0.25 * clm.logits)
    t5 = memory_per_gpu(cfg, activation_checkpointing=False, objective="denoise", **kw)
    assert t5.weights == 4 * num_params(cfg, arch="encdec")
    with pytest.raises(ValueError, match="objective='gpt' is not one of clm, mlm, denoise"):
        estimate("125m", objective="gpt")


def test_loss_formula_bounds_what_autograd_saves():
    """Head + loss: the saved log-probabilities and norm tensors fit within the estimate's peak term."""
    cfg = TransformerConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=512)
    model = Transformer(cfg)
    tokens = torch.randint(0, 512, (2, 300))
    exclude = storages(*model.parameters(), model.rope_cos, model.rope_sin)

    def loss() -> None:
        logits = model(tokens)
        F.cross_entropy(logits.float().view(-1, 512), tokens.view(-1))

    saved = saved_bytes(loss, exclude) - cfg.n_layers * activation_bytes_per_token(cfg, "32-true") * 600
    # the estimate's peak, in the loss's backward = what the head and the loss save + two fp32 gradients
    # of the logits' size (the log-probabilities' and the logits')
    gradients = 2 * 512 * 4 * 600
    assert saved + gradients == pytest.approx(logits_bytes_per_token(cfg, "32-true") * 600, rel=0.01)


# -- recommendation --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "domain, corpus, decision",
    [
        ("general", 1e12, "fine-tune"),
        ("specific", 5e9, "fine-tune"),
        ("specific", 50e9, "continue pre-training"),
        ("specific", 200e9, "pre-train"),
        ("rare_language", 10e9, "pre-train"),
        ("proprietary", 1e9, "pre-train"),
        ("custom_architecture", 1e9, "pre-train"),
    ],
)
def test_decision_tree(domain, corpus, decision):
    r = recommend(corpus_tokens=corpus, domain=domain, budget=None, cost=None, params=1e9)
    assert r.decision == decision


def test_budget_sizes_and_over_budget_warning():
    sizes = {
        b: recommend(corpus_tokens=1e12, domain="proprietary", budget=b, cost=None, params=1e9).model_size
        for b in (5e3, 50e3, 5e5, 2e6)
    }
    assert sizes[5e3].startswith("fine-tune") and sizes[50e3] == "7-13B" and sizes[2e6] == "70B+"
    r = recommend(corpus_tokens=1e9, domain="rare_language", budget=1e4, cost=5e4, params=1e9)
    assert any("over the budget" in x for x in r.reasons)
    assert any("times" in x for x in r.reasons)  # 1 token per parameter: the corpus would be repeated
    e = estimate("1b", gpu="a100", domain="rare_language", budget=100, corpus_tokens=1e9)  # ~$290 at $1.10/h
    assert e.recommendation.decision == "pre-train"
    assert any("over the budget" in x for x in e.recommendation.reasons)


def test_advice_only_when_asked_and_an_honest_model_name(capsys):
    plain = estimate("1b", tokens=20e9)
    assert plain.recommendation is None and plain.model == "1b"
    assert main(["model=1b", "tokens=2e10"]) == 0
    table = capsys.readouterr().out
    assert "recommendation" not in table and "fine-tune" not in table
    assert main(["model=1b", "tokens=2e10", "domain=specific", "corpus_tokens=5e10"]) == 0
    assert "recommendation: continue pre-training" in capsys.readouterr().out
    budget = estimate("1b", budget=5e4).recommendation
    assert budget is not None and budget.decision is None and budget.model_size == "7-13B"
    assert estimate("7b", n_layers=40, vocab_size=50257).model == "7b with vocab_size=50257, n_layers=40"
    assert main(["model=7b", "model.n_layers=40"]) == 0
    assert capsys.readouterr().out.startswith("model 7b with n_layers=40 (decoder")
    h100 = estimate("1b", gpu="h100")
    assert any("prices.h100.<provider>=" in n and "seed" not in n for n in h100.notes)


# -- errors and the command line ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model="70b"), "not a preset: choose one of 125m"),
        (dict(model="7b", n_layer=3), "model.n_layer is not a model key"),
        (dict(model="tiny"), "model.vocab_size is null"),
        (dict(model="7b", gpu="v100"), "gpu='v100'"),
        (dict(model="7b", precision="fp8"), "precision='fp8'"),
        (dict(model="7b", mfu=1.5), "mfu=1.5"),
        (dict(model="7b", domain="medical"), "domain='medical'"),
        (dict(model="7b", seq_len=8192), "seq_len=8192 exceeds model.max_seq_len=4096"),
        (dict(model="7b", prices={"h100": {"x": "cheap"}}), "prices.h100.x='cheap'"),
    ],
)
def test_bad_input_names_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate(**kwargs)


def test_cli_table_and_json(capsys):
    assert main(["model=1b", "tokens=2e10", "gpu=a100", "num_gpus=4", "model.n_layers=8"]) == 0
    out = capsys.readouterr().out
    assert (
        "model 1b with n_layers=8 (decoder, objective=clm): d_model 2048, 8 layers" in out
        and "fsdp + ckpt" in out
        and "lambda $" in out
    )
    assert main(["model=125m", "objective=denoise", "objective.noise_density=0.3", "--json"]) == 0
    denoise = json.loads(capsys.readouterr().out)
    assert denoise["objective"] == "denoise"
    assert (
        denoise["flops_per_token"] > estimate("125m", objective="denoise").flops_per_token
    )  # longer targets
    assert main(["model=1b", "tokens=2e10", "--json", "precision=bf16-true", "+prices.h100.mine=2"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["precision"] == "bf16-true" and e["tokens"] == 2e10 and e["cost"]["h100"]["mine"] > 0
    assert e["params"] == estimate("1b").params
    assert {(m["strategy"], m["activation_checkpointing"]) for m in e["memory"]} == {
        ("ddp", False),
        ("ddp", True),
        ("fsdp", False),
        ("fsdp", True),
    }


@pytest.mark.parametrize(
    "args, match",
    [
        (["model=70b"], "Could not find 'model/70b'; options: 125m"),
        (["model.n_layer=3"], "model.n_layer"),
        (["tokns=1e9"], "tokns"),
        (["tokens=lots"], "tokens"),
        (["precision=fp8"], "precision/fp8"),
        (["gpu=v100"], "gpu='v100'"),
    ],
)
def test_cli_errors(capsys, args, match):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err


def test_python_dash_m(tmp_path):
    proc = run_cli("llmforge.estimate", "model=125m", "json=true", cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["params"] == 134_105_856
    assert not (ROOT / "outputs").exists()  # composes without Hydra's run directory
