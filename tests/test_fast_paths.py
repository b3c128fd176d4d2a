"""The GPU speed switches as far as a CPU can check them: AdamW's kernel choice and gradient clipping with a
fused AdamW, ``strategy.compile=auto``, FP8 (torchao float8 conversion, the refusal without a capable GPU);
the FP8 numerics and the fused kernels themselves run in the ``gpu`` tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llmforge.objectives.base as base
from llmforge.config import resolve_compile
from llmforge.curves import read_scalars
from llmforge.fp8 import fp8_module_filter, lightning_precision, unsupported_reason
from llmforge.objectives.base import adamw_kernel, param_groups
from llmforge.objectives.clm import CausalLM
from llmforge.training import build_module, run

MODEL = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)


def is_float8(module: nn.Module) -> bool:
    """torchao's float8 training linear (its class is not exported; it subclasses nn.Linear)."""
    return isinstance(module, nn.Linear) and type(module).__name__ == "Float8Linear"


def test_adamw_is_foreach_off_cuda_and_fused_needs_cuda_without_fp16_scaler():
    model = nn.Linear(4, 4)
    groups = param_groups(model, 0.1)
    assert adamw_kernel(groups, "bf16-mixed") == {"foreach": True}  # CPU parameters
    assert adamw_kernel([{"params": []}], "bf16-mixed") == {"foreach": True}
    if torch.cuda.is_available():
        cuda = param_groups(model.cuda(), 0.1)
        assert adamw_kernel(cuda, "bf16-mixed") == {"fused": True}
        assert adamw_kernel(cuda, "16-mixed") == {"foreach": True}


def test_gradient_clipping_with_a_fused_adamw_under_bf16_mixed(train_cfg, tmp_path, monkeypatch):
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer; without a scaler the module
    clips itself. CPU has a fused AdamW too: forced here, the run must train as the foreach one does, with
    a clip that binds (a skipped clip would change the weights by far more than the tolerance)."""
    common = ["debug=fast", "precision=bf16-mixed", "trainer.gradient_clip_val=0.05", "trainer.max_steps=4"]
    foreach = run(train_cfg(*common, run_dir=tmp_path / "foreach"))
    monkeypatch.setattr(base, "adamw_kernel", lambda groups, precision: {"fused": True})
    fused = run(train_cfg(*common, run_dir=tmp_path / "fused"))
    a = dict(read_scalars(fused.run_dir)["train/loss"])
    b = dict(read_scalars(foreach.run_dir)["train/loss"])
    assert a == pytest.approx(b, rel=2e-3)
    unclipped = run(train_cfg(*common[:2], "trainer.max_steps=4", run_dir=tmp_path / "unclipped"))
    c = dict(read_scalars(unclipped.run_dir)["train/loss"])
    assert abs(c[3] - b[3]) > 10 * abs(a[3] - b[3])  # the clip mattered, and the fused run applied it


def test_compile_auto_is_on_for_cuda_only(train_cfg, tiny_data):
    assert resolve_compile("auto", "gpu") and resolve_compile("auto", "cuda")
    assert not resolve_compile("auto", "cpu")
    assert resolve_compile("auto", "auto") == torch.cuda.is_available()
    assert resolve_compile(True, "cpu") and not resolve_compile(False, "gpu")
    from llmforge.data.shards import read_manifest

    cfg = train_cfg("debug=fast")
    assert cfg.strategy.compile == "auto"
    assert build_module(cfg, read_manifest(tiny_data)).compile_blocks is False
    with pytest.raises(ValueError, match="strategy.compile"):
        run(train_cfg("debug=fast", "strategy.compile=sometimes"))


def test_fp8_composes_and_stops_before_the_first_step_without_a_capable_gpu(train_cfg, tmp_path):
    cfg = train_cfg("debug=fast", "precision=fp8-mixed")
    assert cfg.precision.value == "fp8-mixed" and lightning_precision("fp8-mixed") == "bf16-mixed"
    reason = unsupported_reason("cpu")
    assert reason is not None and "\n" not in reason and "fp8-mixed" in reason
    with pytest.raises(ValueError, match="precision=fp8-mixed needs"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before anything ran


def test_float8_conversion_swaps_block_linears_but_not_the_head():
    pytest.importorskip("torchao.float8")
    from llmforge.fp8 import convert_to_float8

    module = CausalLM(MODEL, {"lr": 1e-3}, {"pad": 0})
    names = [k for k, _ in module.model.named_parameters()]
    linears = [n for n, m in module.model.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    assert linears and all(fp8_module_filter(module.model.get_submodule(n), n) for n in linears)
    convert_to_float8(module.model)
    assert all(is_float8(module.model.get_submodule(n)) for n in linears)
    assert type(module.model.head) is nn.Linear and type(module.model.embed) is nn.Embedding
    assert [k for k, _ in module.model.named_parameters()] == names  # checkpoints stay interchangeable
    assert not fp8_module_filter(nn.Linear(64, 40), "blocks.0.attn.qkv")  # float8 matmuls need 16 | dims
    qkv = module.model.get_submodule("blocks.0.attn.qkv")
    assert not qkv.config.enable_fsdp_float8_all_gather and type(qkv.weight) is nn.Parameter
    sharded = CausalLM(MODEL, {"lr": 1e-3}, {"pad": 0})
    convert_to_float8(sharded.model, fsdp=True)  # under strategy=fsdp: weights all-gathered in float8
    qkv = sharded.model.get_submodule("blocks.0.attn.qkv")
    assert qkv.config.enable_fsdp_float8_all_gather
    assert type(qkv.weight).__name__ == "WeightWithDynamicFloat8CastTensor"


def cpu_float8_matmul() -> bool:
    """Whether this torch multiplies float8 tensors on CPU (torch._scaled_mm; recent releases do)."""
    a = torch.ones(16, 32).to(torch.float8_e4m3fn)
    one = torch.ones(())
    try:
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def test_float8_model_trains_close_to_bf16_on_cpu():
    """The converted model really computes in float8 (its loss differs from bf16's) and stays close to it:
    loss within 2%, every block weight's gradient pointing the same way (cosine > 0.98). The run itself
    refuses FP8 on CPU; this checks the conversion's numbers where torch can emulate them."""
    pytest.importorskip("torchao.float8")
    if not cpu_float8_matmul():
        pytest.skip("this torch has no float8 matmul on CPU")
    import copy

    from llmforge.fp8 import convert_to_float8

    torch.manual_seed(0)
    bf16 = CausalLM(MODEL, {"lr": 1e-3}, {"pad": 0})
    fp8 = copy.deepcopy(bf16)
    convert_to_float8(fp8.model)
    tokens = torch.randint(1, 512, (4, 65), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    losses = []
    for module in (bf16, fp8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.loss(batch)[0]
        loss.backward()
        losses.append(float(loss.detach()))
    assert losses[0] != losses[1] and abs(losses[1] - losses[0]) < 0.02 * losses[0]
    grads = dict(fp8.model.named_parameters())
    for name, p in bf16.model.named_parameters():
        if name.startswith("blocks.") and p.dim() == 2:
            cos = F.cosine_similarity(p.grad.flatten(), grads[name].grad.flatten(), dim=0)
            assert cos > 0.98, (name, float(cos))


def test_configure_model_converts_under_fp8(tiny_data, train_cfg):
    pytest.importorskip("torchao.float8")
    from llmforge.data.shards import read_manifest

    module = build_module(train_cfg("precision=fp8-mixed"), read_manifest(tiny_data))
    assert module.float8
    module.configure_model()
    qkv = [m for n, m in module.model.named_modules() if n.endswith("attn.qkv")]
    assert len(qkv) == 2 and all(is_float8(m) for m in qkv) and not is_float8(module.model.head)


@pytest.mark.gpu
def test_fp8_trains_like_bf16_on_gpu(train_cfg, tmp_path):
    """50 steps of the tiny model on one batch: FP8's loss stays within a few percent of bf16's."""
    if unsupported_reason("gpu"):
        pytest.skip(unsupported_reason("gpu"))
    common = ["debug=overfit", "hardware=gpu", "trainer.max_steps=50", "model.d_model=128"]
    bf16 = run(train_cfg(*common, "precision=bf16-mixed", run_dir=tmp_path / "bf16"))
    fp8 = run(train_cfg(*common, "precision=fp8-mixed", run_dir=tmp_path / "fp8"))
    a = dict(read_scalars(bf16.run_dir)["train/loss"])
    b = dict(read_scalars(fp8.run_dir)["train/loss"])
    assert b[49] < 0.5 * b[0]  # it learns
    assert abs(b[49] - a[49]) < 0.05 * a[0]
    assert sum(abs(b[k] - a[k]) for k in a) / len(a) < 0.03 * a[0]
