"""The head's loss: chunked (fused) linear + cross-entropy against the plain head + F.cross_entropy, z-loss
against its definition, for every objective; torch.compile of the chunked path; the config switches."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmforge.curves import read_scalars
from llmforge.objectives.clm import CausalLM
from llmforge.objectives.denoise import Denoise
from llmforge.objectives.loss import chunked_loss, default_chunk, logits_loss
from llmforge.objectives.mlm import MaskedLM
from llmforge.training import run

VOCAB = 1000
SPECIALS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4, **{f"sentinel_{i}": 5 + i for i in range(40)}}
MODEL = dict(vocab_size=1024, d_model=32, n_layers=1, n_heads=2, max_seq_len=128)
OPTIM = dict(lr=1e-3)


def direct(logits: torch.Tensor, labels: torch.Tensor, z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The definitions: mean cross-entropy and z_loss * mean(logsumexp^2), over labels != -100."""
    flat, target = logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = target != -100
    lse = torch.logsumexp(flat[keep], dim=-1)
    ce = (lse - flat[keep].gather(1, target[keep, None]).squeeze(1)).mean()
    return ce, z_loss * lse.square().mean()


def random_head(n=300, d=48, v=700, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = (0.2 * torch.randn(v, d, generator=g)).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [64, 77, None, 10_000])
def test_chunked_equals_plain_head_and_cross_entropy(z_loss, chunk):
    hidden, weight, labels = random_head()
    ref_ce, ref_z = direct(hidden @ weight.t(), labels, z_loss)
    ref = ref_ce + ref_z
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for result in (
        chunked_loss(hidden, weight, labels, z_loss=z_loss, chunk=chunk, accuracy=True),
        logits_loss(hidden @ weight.t(), labels, z_loss=z_loss, accuracy=True),
    ):
        torch.testing.assert_close(result.loss, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.ce, ref_ce.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.z_loss, ref_z.detach(), rtol=1e-5, atol=1e-8)
        assert int(result.count) == int((labels != -100).sum())
        grads = torch.autograd.grad(result.loss, (hidden, weight))
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # accuracy: the argmax of the scored rows
    keep = labels != -100
    correct = ((hidden @ weight.t()).argmax(-1)[keep] == labels[keep]).sum()
    assert int(chunked_loss(hidden, weight, labels, accuracy=True, chunk=chunk).correct) == int(correct)


def test_z_loss_gradient_flows_and_upstream_gradient_scales():
    hidden, weight, labels = random_head(seed=1)
    plain = torch.autograd.grad(chunked_loss(hidden, weight, labels).loss, weight)[0]
    with_z = torch.autograd.grad(chunked_loss(hidden, weight, labels, z_loss=0.1).loss, weight)[0]
    lse = torch.logsumexp(hidden @ weight.t(), -1)[labels != -100]
    z_only = torch.autograd.grad(0.1 * lse.square().mean(), weight)[0]
    assert (with_z - plain).abs().max() > 1e-3  # the penalty moves the weights
    torch.testing.assert_close(with_z - plain, z_only, rtol=1e-4, atol=1e-6)
    # backward multiplies the saved gradients by the upstream one (loss scaling, accumulation)
    scaled = torch.autograd.grad(3.0 * chunked_loss(hidden, weight, labels).loss, weight)[0]
    torch.testing.assert_close(scaled, 3 * plain)


def test_no_scored_token_gives_a_zero_loss_and_zero_gradients():
    hidden, weight, labels = random_head(n=20)
    labels[:] = -100
    result = chunked_loss(hidden, weight, labels, z_loss=1e-3)
    assert float(result.loss.detach()) == 0.0 and int(result.count) == 0
    gh, gw = torch.autograd.grad(result.loss, (hidden, weight))
    assert not gh.any() and not gw.any()


def test_bf16_autocast_follows_the_plain_path():
    """Under autocast the head's matmul runs in bf16 in both paths, the softmax in fp32."""
    hidden, weight, labels = random_head(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = chunked_loss(hidden, weight, labels, z_loss=1e-3)
        plain = logits_loss(F.linear(hidden, weight), labels, z_loss=1e-3)
    assert fused.loss.dtype == torch.float32
    torch.testing.assert_close(fused.loss, plain.loss, rtol=2e-3, atol=2e-3)
    gf = torch.autograd.grad(fused.loss, (hidden, weight))
    gp = torch.autograd.grad(plain.loss, (hidden, weight))
    assert gf[0].dtype == hidden.dtype and gf[1].dtype == weight.dtype
    for a, b in zip(gf, gp, strict=True):
        assert (a - b).abs().max() < 0.02 * b.abs().max()


def test_default_chunk():
    assert default_chunk(8 * 4096, 32_000, 2048) == 4096  # logits of a chunk ~ the batch's hidden states
    assert default_chunk(100, 32_000, 64) == 100  # never more than all tokens
    assert default_chunk(100_000, 128_000, 64) == 256  # at least 256 rows


@pytest.mark.gpu
@pytest.mark.parametrize("use_liger", [False, True])
def test_cuda_paths_equal_the_plain_head(use_liger):
    """On CUDA: the torch chunked path, and Liger-Kernel's kernel where it is installed."""
    from llmforge.objectives.loss import liger_available

    if use_liger and not liger_available():
        pytest.skip("liger-kernel is not installed")
    hidden, weight, labels = (t.detach().cuda() for t in random_head(n=1000, v=3000))
    hidden.requires_grad_()
    weight.requires_grad_()
    want = logits_loss(hidden @ weight.t(), labels, z_loss=1e-2)
    got = chunked_loss(hidden, weight, labels, z_loss=1e-2, chunk=256, use_liger=use_liger)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.z_loss, want.z_loss, rtol=1e-4, atol=1e-6)
    got_grads = torch.autograd.grad(got.loss, (hidden, weight))
    want_grads = torch.autograd.grad(want.loss, (hidden, weight))
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


# -- every objective: fused vs plain head, z-loss against the model's logits ----------------------------
def clm_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(20, VOCAB, (3, 33), generator=g)
    labels = tokens[:, 1:].clone()
    labels[-1, -5:] = -100  # window padding
    return {"input_ids": tokens[:, :-1], "labels": labels}


def windows(n: int, seq_len: int) -> list[dict]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(50, VOCAB, size=(n, seq_len + 1))
    tokens[-1, -6:] = -1  # a padded last window: -100 labels, attention mask
    return [{"index": i, "tokens": t} for i, t in enumerate(tokens)]


def build(objective: str, fused: bool, z_loss: float):
    kw = dict(fused_ce=fused, z_loss=z_loss)
    data = {"seq_len": 48, "vocab_size": VOCAB}
    torch.manual_seed(0)  # the same weights for the fused and the plain module
    if objective == "clm":
        return CausalLM(MODEL, OPTIM, SPECIALS, data=data, **kw), clm_batch()
    cls = MaskedLM if objective == "mlm" else Denoise
    module = cls(MODEL, OPTIM, SPECIALS, data=data, **kw)
    return module, module.collate_fn()(windows(3, 48))


def reference_logits(objective: str, module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the scored positions, from the model's own forward (its head), and their labels."""
    if objective == "clm":
        return module.model(batch["input_ids"]), batch["labels"]
    if objective == "mlm":
        positions = batch["mlm_positions"]
        logits = module.model(batch["input_ids"], batch.get("attention_mask"), positions)
        return logits, batch["labels"].flatten().index_select(0, positions)
    logits = module.model(batch["input_ids"], batch["decoder_input_ids"], batch.get("attention_mask"))
    return logits, batch["labels"]


@pytest.mark.parametrize("objective", ["clm", "mlm", "denoise"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_objective_loss_fused_equals_plain_and_the_definition(objective, z_loss):
    fused, batch = build(objective, True, z_loss)
    plain, _ = build(objective, False, z_loss)
    if objective != "mlm":
        assert (batch["labels"] == -100).any()  # ignored labels are in the batch
    loss_f, n_f, extra_f = fused.loss(batch)
    loss_p, n_p, extra_p = plain.loss(batch)
    logits, labels = reference_logits(objective, plain, batch)
    ce, z = direct(logits, labels, z_loss)
    assert n_f == n_p == int((labels != -100).sum())
    for loss, extra in ((loss_f, extra_f), (loss_p, extra_p)):
        torch.testing.assert_close(loss, ce + z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(type(fused).cross_entropy(loss, extra), ce.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(extra["z_loss"], z.detach(), rtol=1e-5, atol=1e-9)
    if "acc" in extra_p:
        torch.testing.assert_close(extra_f["acc"], extra_p["acc"])
    loss_f.backward()
    loss_p.backward()
    grads_f = dict(fused.model.named_parameters())
    for name, p in plain.model.named_parameters():
        torch.testing.assert_close(grads_f[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert plain.model.head.weight.grad.abs().sum() > 0 and fused.model.embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("objective", ["clm", "mlm", "denoise"])
def test_objective_gradient_is_that_of_the_definition_z_loss_included(objective):
    """The gradient of every parameter (head, blocks, embedding) is the gradient of cross-entropy + z-loss
    computed directly from the model's logits; the z-loss term moves it (so a dropped term would show)."""
    z_loss = 5e-2
    fused, batch = build(objective, True, z_loss)
    fused.loss(batch)[0].backward()
    definition, _ = build(objective, False, z_loss)
    ce, z = direct(*reference_logits(objective, definition, batch), z_loss)
    (ce + z).backward()
    without_z, _ = build(objective, False, 0.0)
    direct(*reference_logits(objective, without_z, batch), 0.0)[0].backward()
    want = dict(definition.model.named_parameters())
    ce_only = dict(without_z.model.named_parameters())
    moved = 0
    for name, p in fused.model.named_parameters():
        if want[name].grad is None:  # a parameter the loss does not reach
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, want[name].grad, rtol=1e-4, atol=1e-6, msg=name)
        gap = (want[name].grad - ce_only[name].grad).abs().max()
        moved += bool(gap > 100 * (p.grad - want[name].grad).abs().max() + 1e-6)
    assert moved >= 3  # head, embedding and block weights at least: the z-loss gradient flows through


@pytest.mark.parametrize("objective", ["clm", "mlm", "denoise"])
def test_fused_loss_keeps_mup_and_document_masking(objective):
    """The recipes reach the chunked head: with µP (output multiplier 1/4) and document masking on, the
    fused loss equals the plain one, and masking the documents changes it (so the doc ids got through)."""
    model = {**MODEL, "mup": True, "mup_base_width": 8}
    samples = windows(3, 48)
    for row, cut in ((0, 10), (0, 30), (1, 20), (2, 5)):
        samples[row]["tokens"][cut] = SPECIALS["eos"]
    cls = {"clm": CausalLM, "mlm": MaskedLM, "denoise": Denoise}[objective]
    losses = {}
    for fused in (True, False):
        for masked in (True, False):
            data = {"seq_len": 48, "vocab_size": VOCAB, "document_mask": masked}
            data["document_positions"] = "reset"
            torch.manual_seed(0)
            module = cls(model, OPTIM, SPECIALS, data=data, fused_ce=fused, z_loss=1e-3)
            assert module.model_cfg.width_mult == 4.0
            torch.manual_seed(1)  # the same masking draws for every module
            batch = module.collate_fn()(samples)
            assert any(k.endswith("doc_ids") for k in batch) == masked
            losses[fused, masked] = module.loss(batch)[0]
    for masked in (True, False):
        torch.testing.assert_close(losses[True, masked], losses[False, masked], rtol=1e-5, atol=1e-6)
    assert (losses[True, True] - losses[True, False]).abs() > 1e-4


@pytest.mark.slow  # inductor's C++ compilation: ~1-3 min on 2 loaded cores
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_chunked_loss_compiles():
    hidden, weight, labels = random_head(n=256, seed=3)
    eager = chunked_loss(hidden, weight, labels, z_loss=1e-3, chunk=64)
    compiled_fn = torch.compile(lambda h, w, y: chunked_loss(h, w, y, z_loss=1e-3, chunk=64).loss)
    loss = compiled_fn(hidden, weight, labels)
    torch.testing.assert_close(loss, eager.loss, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, (hidden, weight))
    want = torch.autograd.grad(eager.loss, (hidden, weight))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- through the trainer ------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["clm", "mlm", "denoise"])
def test_z_loss_is_logged_beside_the_cross_entropy(train_cfg, tmp_path, objective):
    common = ["debug=fast", f"objective={objective}", "objective.z_loss=1e-3", "trainer.max_steps=3"]
    fused = run(train_cfg(*common, run_dir=tmp_path / "fused"))
    scalars = read_scalars(fused.run_dir)
    z, loss = dict(scalars["train/z_loss"]), dict(scalars["train/loss"])
    assert len(z) == 3 and all(0 < v < 1 for v in z.values()) and set(loss) == set(z)
    if objective == "clm":  # the plain path logs the same cross-entropy (not ce + z) and z-loss
        plain = run(train_cfg(*common, "objective.fused_ce=false", run_dir=tmp_path / "plain"))
        assert loss == pytest.approx(dict(read_scalars(plain.run_dir)["train/loss"]), rel=1e-4)
        assert z == pytest.approx(dict(read_scalars(plain.run_dir)["train/z_loss"]), rel=1e-4)
        off = run(train_cfg("debug=fast", run_dir=tmp_path / "off"))
        assert "train/z_loss" not in read_scalars(off.run_dir)  # not logged when off


def test_z_loss_must_not_be_negative(train_cfg):
    with pytest.raises(ValueError, match="objective.z_loss"):
        run(train_cfg("debug=fast", "objective.z_loss=-1"))


def test_fp16_head_gradient_keeps_the_small_softmax_terms():
    """fp16 with a loss scale: the mean's 1 / count is applied with the upstream gradient, so the softmax part
    of the head's gradient (about 1 / (V N) per entry, below fp16's smallest subnormal) does not vanish."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 8192, 16, 4096
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 0.1
    labels = torch.randint(0, 100, (n,), generator=g)  # rows 100.. of the head are never a target
    grads = {}
    for dtype in (torch.float32, torch.float16):
        h = hidden.to(dtype).detach().requires_grad_()
        w = weight.to(dtype).detach().requires_grad_()
        chunked_loss(h, w, labels).loss.backward(torch.tensor(1024.0))  # a loss scale, as fp16 AMP's
        grads[dtype] = (h.grad.float(), w.grad.float())
    (h32, w32), (h16, w16) = grads[torch.float32], grads[torch.float16]
    assert w32[100:].abs().max() > 0 and (w16[100:] != 0).float().mean() > 0.99
    # fp16 rounding only (before the 1 / count moved to backward, the softmax-only rows were all 0)
    for got, want in ((w16[100:], w32[100:]), (w16, w32), (h16, h32)):
        assert (got - want).norm() < 0.01 * want.norm()


def test_no_gradient_work_without_grad_mode():
    """Under no_grad (validation, evaluation) the chunked head runs one matmul per chunk (the logits) and
    none for the gradients it would otherwise compute in its forward."""
    from torch.profiler import ProfilerActivity, profile

    hidden, weight = torch.randn(1024, 32), torch.nn.Parameter(torch.randn(500, 32))
    labels = torch.arange(1024) % 500

    def matmuls(grad: bool) -> int:
        with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU]) as prof:
            chunked_loss(hidden, weight, labels, chunk=256)
        kinds = ("aten::mm", "aten::matmul", "aten::addmm")
        return sum(e.count for e in prof.key_averages() if e.key in kinds)

    assert matmuls(False) < matmuls(True)
    with torch.no_grad():
        loss = chunked_loss(hidden, weight, labels, chunk=256).loss
    torch.testing.assert_close(loss, logits_loss(hidden @ weight.t(), labels).loss)
