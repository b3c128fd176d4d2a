"""Scale-out switches: FSDP2 mixed precision, activation checkpointing, torch.compile, consolidation.

Multi-process runs go through `python -m llmforge.train` in subprocesses (gloo on CPU); the rest runs in
this process with `strategy=auto`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from llmforge.checkpoints import consolidate, index_optimizer_state, load_sharded
from llmforge.curves import read_scalars
from llmforge.models.transformer import Transformer, TransformerConfig
from llmforge.objectives.base import checkpoint_activations, fsdp_mixed_precision
from llmforge.objectives.clm import CausalLM
from llmforge.training import run
from tests.conftest import REFERENCE, reference_cli, run_cli


def losses(run_dir: Path) -> dict[int, float]:
    return dict(read_scalars(run_dir)["train/loss"])


# -- mixed precision ----------------------------------------------------------------------------------


def test_mixed_precision_policy_follows_precision():
    mixed = fsdp_mixed_precision("bf16-mixed")
    assert (mixed.param_dtype, mixed.reduce_dtype) == (torch.bfloat16, torch.float32)
    fp16 = fsdp_mixed_precision("16-mixed")
    assert (fp16.param_dtype, fp16.reduce_dtype) == (torch.float16, torch.float32)
    true = fsdp_mixed_precision("bf16-true")
    assert (true.param_dtype, true.reduce_dtype) == (None, torch.float32)
    full = fsdp_mixed_precision("32-true")
    assert (full.param_dtype, full.reduce_dtype) == (None, None)


def test_fsdp_with_16_mixed_is_refused(train_cfg):
    with pytest.raises(ValueError, match="16-mixed.*fsdp"):
        run(train_cfg("strategy=fsdp", "precision=16-mixed", "hardware=gpu"))


class RecordDtypes(L.Callback):
    """Writes `dtypes_rank{r}.json`: the first block's QKV weight as stored between steps (the sharded
    parameter the optimizer updates) and as the matmul sees it inside forward."""

    def on_train_start(self, trainer, pl_module):
        self.inside: set[str] = set()
        qkv = pl_module.model.blocks[0].attn.qkv

        @torch._dynamo.disable  # runs eagerly inside a compiled block too
        def record(module, args):
            self.inside.add(str(module.weight.dtype))

        qkv.register_forward_pre_hook(record)

    def on_train_end(self, trainer, pl_module):
        weight = pl_module.model.blocks[0].attn.qkv.weight
        record = {"stored": str(weight.dtype), "type": type(weight).__name__, "inside": sorted(self.inside)}
        path = Path(trainer.default_root_dir) / f"dtypes_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))


@pytest.mark.slow
def test_fsdp_bf16_mixed_keeps_fp32_parameters_and_computes_in_bf16(tmp_path, tiny_data):
    proc = run_cli(
        "llmforge.train",
        "strategy=fsdp",
        "hardware.devices=2",
        "precision=bf16-mixed",
        "strategy.activation_checkpointing=true",
        "debug=fast",
        "model=tiny",
        f"data.path={tiny_data}",
        "data.seq_len=32",
        "name=mp",
        "+callbacks.dtypes._target_=tests.test_fsdp.RecordDtypes",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "runs" / "mp"
    for rank in (0, 1):
        record = json.loads((run_dir / f"dtypes_rank{rank}.json").read_text())
        assert record == {"stored": "torch.float32", "type": "DTensor", "inside": ["torch.bfloat16"]}
    state = load_sharded(run_dir / "checkpoints" / "last.ckpt")
    assert all(t.dtype == torch.float32 for t in state["state_dict"].values())
    moments = state["optimizer_states"][0]["state"][0]
    assert moments["exp_avg"].dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(run_dir).values())


# -- activation checkpointing and torch.compile -------------------------------------------------------


def saved_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of the tensors autograd keeps for backward during one forward, and the loss."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens).float().logsumexp(-1).mean()
    return total, loss


def test_activation_checkpointing_keeps_results_and_saves_less():
    cfg = TransformerConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=128)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    checkpointed = Transformer(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    for block in checkpointed.blocks:
        checkpoint_activations(block)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()  # names unchanged
    tokens = torch.randint(0, 256, (4, 128))
    kept_plain, loss_plain = saved_bytes(plain, tokens)
    kept_ckpt, loss_ckpt = saved_bytes(checkpointed, tokens)
    assert kept_ckpt < 0.5 * kept_plain, (kept_ckpt, kept_plain)  # only each block's input stays
    loss_plain.backward()
    loss_ckpt.backward()
    assert torch.equal(loss_plain, loss_ckpt)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_activation_checkpointing_switch_trains_the_same(train_cfg, tmp_path):
    common = ("debug=fast", "trainer.val_check_interval=100")
    plain = run(train_cfg(*common, run_dir=tmp_path / "plain"))
    ac = run(train_cfg(*common, "strategy.activation_checkpointing=true", run_dir=tmp_path / "ac"))
    assert ac.global_step == plain.global_step == 2
    assert losses(ac.run_dir) == pytest.approx(losses(plain.run_dir), rel=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compile_switch_trains_the_same(train_cfg, tmp_path):
    common = ("debug=fast", "trainer.val_check_interval=100", "trainer.max_steps=3")
    eager = run(train_cfg(*common, run_dir=tmp_path / "eager"))
    compiled = run(
        train_cfg(
            *common, "strategy.compile=true", "strategy.activation_checkpointing=true", run_dir=tmp_path / "c"
        )
    )
    assert losses(compiled.run_dir) == pytest.approx(losses(eager.run_dir), rel=1e-4)
    first = dict(read_scalars(compiled.run_dir)["perf/first_step_s"])  # the compilation's cost is logged
    assert list(first) == [0] and first[0] > 0 and "perf/first_step_s" not in read_scalars(eager.run_dir)
    a = torch.load(eager.last_checkpoint, weights_only=False)["state_dict"]
    b = torch.load(compiled.last_checkpoint, weights_only=False)["state_dict"]
    assert a.keys() == b.keys()  # no `_orig_mod` in the names: checkpoints stay interchangeable
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5, msg=key)


# -- consolidation ------------------------------------------------------------------------------------


def test_index_optimizer_state_numbers_parameters_in_model_order():
    state = {
        "state": {"b": {"step": 1}, "a": {"step": 2}, "c": {"step": 3}},
        "param_groups": [{"lr": 1.0, "params": ["b", "c"]}, {"lr": 2.0, "params": ["a"]}],
    }
    out = index_optimizer_state(state, ["a", "buffer", "b", "c"])
    assert out["param_groups"] == [{"lr": 1.0, "params": [1, 2]}, {"lr": 2.0, "params": [0]}]
    assert out["state"] == {1: {"step": 1}, 0: {"step": 2}, 2: {"step": 3}}
    # torch's own loader matches parameters by their place in the groups
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [b, c], "lr": 1.0}, {"params": [a], "lr": 2.0}], momentum=0.9)
    saved = {
        "state": {1: {"momentum_buffer": torch.ones(1)}, 0: {"momentum_buffer": 2 * torch.ones(1)}},
        "param_groups": [
            {**g, "params": p} for g, p in zip(opt.state_dict()["param_groups"], ([1, 2], [0]), strict=True)
        ],
    }
    opt.load_state_dict(saved)
    assert opt.state[b]["momentum_buffer"].item() == 1 and opt.state[a]["momentum_buffer"].item() == 2
    with pytest.raises(ValueError, match="model state lacks"):
        index_optimizer_state(state, ["a", "b"])


def test_consolidate_refuses_what_is_not_a_sharded_checkpoint(tmp_path):
    (tmp_path / "file.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="single-file checkpoint already"):
        consolidate(tmp_path / "file.ckpt")
    (tmp_path / "empty.ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match="not a sharded checkpoint"):
        consolidate(tmp_path / "empty.ckpt")


PROBE = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))  # tiny data: vocab 512


def logits_of(checkpoint: dict, tokens: torch.Tensor = PROBE) -> torch.Tensor:
    """A plain `Transformer`, no Lightning, loaded from a checkpoint's `model.` weights."""
    model = Transformer(TransformerConfig(**checkpoint["hyper_parameters"]["model"]))
    prefix = "model."
    model.load_state_dict({k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items()})
    with torch.no_grad():
        return model(tokens)


class RecordLogits(L.Callback):
    """At the end of training, the live (sharded) model's logits on `PROBE` -> `probe_logits.pt` (rank 0)."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            logits = pl_module.model(PROBE)  # every rank runs it: FSDP gathers each block's shards
        if trainer.is_global_zero:
            torch.save(logits, Path(trainer.default_root_dir) / "probe_logits.pt")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.slow
def test_fsdp_ddp_and_one_process_agree_and_consolidated_checkpoint_loads_and_resumes(
    tmp_path, tiny_data, train_cfg, fsdp_run, ddp_run
):
    """Same data and global batch (2 ranks x 2 = 1 process x 4): FSDP2 (with activation checkpointing;
    stopped at step 2 and resumed from its sharded checkpoint), DDP and one process reach the same weights;
    the consolidated FSDP checkpoint holds exactly the weights of the sharded model, and is an ordinary
    checkpoint: loaded by the objective and resumed. (The two reference runs: tests/conftest.py.)"""
    common = (*REFERENCE, "trainer.max_steps=4")
    single = run(train_cfg(*common, run_dir=tmp_path / "single"))  # batch 4, one process

    ckpts = fsdp_run.run_dir / "checkpoints"
    assert (ckpts / "last.ckpt").is_dir()
    fsdp = torch.load(ckpts / "last.consolidated.ckpt", weights_only=False)  # python -m llmforge.consolidate
    ddp = torch.load(ddp_run.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    one = torch.load(single.last_checkpoint, weights_only=False)
    one_mid = torch.load(single.run_dir / "checkpoints" / "step0000002.ckpt", weights_only=False)
    assert fsdp["state_dict"].keys() == ddp["state_dict"].keys() == one["state_dict"].keys()
    assert fsdp["global_step"] == ddp["global_step"] == 4
    assert fsdp["ShardDataModule"] == ddp["ShardDataModule"] == one["ShardDataModule"]
    assert fsdp["hyper_parameters"] == ddp["hyper_parameters"]

    # consolidation is exact: a plain module from the single file computes what the sharded model computed
    live = torch.load(fsdp_run.run_dir / "probe_logits.pt")
    torch.testing.assert_close(logits_of(fsdp), live, rtol=1e-6, atol=1e-6)
    # the three strategies agree to float noise (~1e-5), far below what the last two steps changed (~1);
    # AdamW took 4 steps everywhere (no phantom step from the FSDP checkpoint saved before the first one)
    moved = max_diff(logits_of(one), logits_of(one_mid))
    assert moved > 0.1
    assert max_diff(logits_of(fsdp), logits_of(ddp)) < 1e-3
    assert max_diff(logits_of(one), logits_of(ddp)) < 1e-3
    assert {float(s["step"]) for s in fsdp["optimizer_states"][0]["state"].values()} == {4.0}

    # an ordinary Lightning checkpoint: the objective's own loader reads it
    module = CausalLM.load_from_checkpoint(ckpts / "last.consolidated.ckpt", map_location="cpu")
    with torch.no_grad():
        torch.testing.assert_close(module(PROBE), logits_of(fsdp))

    # resumable: step 2 of the FSDP run continued in one process (batch 4: the same samples)
    mid = consolidate(ckpts / "step0000002.ckpt", tmp_path / "mid.ckpt")
    resumed = run(train_cfg(*common, f"resume={mid}", run_dir=tmp_path / "resumed"))
    assert resumed.global_step == 4
    final = torch.load(resumed.last_checkpoint, weights_only=False)
    assert final["ShardDataModule"]["cursor"] == fsdp["ShardDataModule"]["cursor"] == 16
    assert max_diff(logits_of(final), logits_of(fsdp)) < 1e-3
    single_losses, resumed_losses = losses(single.run_dir), losses(resumed.run_dir)
    assert sorted(resumed_losses) == [2, 3]  # the same batches as the one-process run, the same losses
    assert resumed_losses == pytest.approx({s: single_losses[s] for s in (2, 3)}, rel=1e-3)

    # ... and under FSDP again (Lightning maps the single file's optimizer ids to the model's parameters)
    proc = run_cli(
        "llmforge.train",
        *common,
        *reference_cli(tiny_data),
        "strategy=fsdp",
        f"resume={mid}",
        "name=fsdp-again",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = consolidate(tmp_path / "runs" / "fsdp-again" / "checkpoints" / "last.ckpt")
    assert max_diff(logits_of(torch.load(again, weights_only=False)), logits_of(fsdp)) < 1e-3


@pytest.mark.gpu
def test_fsdp_on_gpu_bf16_mixed_with_checkpointing_and_compile(tmp_path, tiny_data):
    """One GPU: FSDP2 with the bf16 policy, activation checkpointing and compile train, save sharded, and
    the consolidated checkpoint holds fp32 weights."""
    proc = run_cli(
        "llmforge.train",
        "strategy=fsdp",
        "hardware=gpu",
        "precision=bf16-mixed",
        "strategy.activation_checkpointing=true",
        "strategy.compile=true",
        "debug=fast",
        "trainer.max_steps=3",
        "model=tiny",
        f"data.path={tiny_data}",
        "data.seq_len=32",
        "name=gpu",
        "+callbacks.dtypes._target_=tests.test_fsdp.RecordDtypes",
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "runs" / "gpu"
    record = json.loads((run_dir / "dtypes_rank0.json").read_text())
    assert record["stored"] == "torch.float32" and record["inside"] == ["torch.bfloat16"]
    out = consolidate(run_dir / "checkpoints" / "last.ckpt")
    state = torch.load(out, weights_only=False)
    assert state["global_step"] == 3
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state["state_dict"].values())
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(run_dir).values())
