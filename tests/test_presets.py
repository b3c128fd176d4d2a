"""Every model preset up to 7b, built on the meta device (no memory) for each architecture: parameter counts
against `num_params`, against Hugging Face's LlamaForCausalLM of the same shape and against published
counts, and the memory per GPU the estimator gives for ddp vs fsdp.

(tests/test_model.py checks the decoder presets' counts against their names; this file adds the other
architectures, the independent implementation and the memory estimate.)
"""

from __future__ import annotations

import pytest
import torch

from llmforge.estimate import PRECISION_BYTES, load_preset, memory_per_gpu
from llmforge.models.transformer import Encoder, EncoderDecoder, Transformer, TransformerConfig, num_params

PRESETS = ["tiny", "mini", "125m", "350m", "1b", "3b", "7b"]
ARCHS = {"decoder": Transformer, "encoder": Encoder, "encdec": EncoderDecoder}
# published parameter counts of models whose architecture the preset reproduces exactly
PUBLISHED = {"7b": 6_738_415_616}  # Llama-2-7B (vocab 32000, untied; the Hugging Face checkpoint's count)


def preset(name: str) -> TransformerConfig:
    raw = load_preset(name)
    raw["vocab_size"] = raw["vocab_size"] or 8192  # tiny and mini take theirs from the data
    return TransformerConfig(**raw)


def unique_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return list({id(p): p for p in module.parameters()}.values())


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_on_meta_with_its_counted_parameters(name, arch):
    cfg = preset(name)
    with torch.device("meta"):
        model = ARCHS[arch](cfg)
    params = unique_params(model)
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) == num_params(cfg, arch=arch)
    if name in PUBLISHED and arch != "encdec":
        assert num_params(cfg, arch=arch) == PUBLISHED[name]


@pytest.mark.parametrize("name", PRESETS)
def test_decoder_preset_matches_transformers_llama_count(name):
    """The same shape built by an independent implementation (LlamaForCausalLM, on meta) has exactly as
    many parameters."""
    transformers = pytest.importorskip("transformers")
    from llmforge.hf import hf_config

    cfg = preset(name)
    config = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    assert sum(p.numel() for p in unique_params(llama)) == num_params(cfg)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_memory_per_gpu_ddp_vs_fsdp(precision, capsys):
    """Memory per GPU for every preset, 8 GPUs, micro-batch 1 x max_seq_len: model states agree with the
    meta-built module's parameter bytes, and FSDP needs less than DDP."""
    bytes_ = PRECISION_BYTES[precision]
    rows = []
    for name in PRESETS[2:]:
        cfg = preset(name)
        with torch.device("meta"):
            model = Transformer(cfg)
        numel = sum(p.numel() for p in unique_params(model))
        kw = dict(num_gpus=8, precision=precision, seq_len=cfg.max_seq_len, batch_size=1)
        ddp = memory_per_gpu(cfg, strategy="ddp", activation_checkpointing=False, **kw)
        fsdp = memory_per_gpu(cfg, strategy="fsdp", activation_checkpointing=False, **kw)
        fsdp_ckpt = memory_per_gpu(cfg, strategy="fsdp", activation_checkpointing=True, **kw)
        states = bytes_.weights + bytes_.working + bytes_.grads + bytes_.optim
        assert ddp.weights + ddp.working_copy + ddp.grads + ddp.optimizer == numel * states
        assert fsdp.weights + fsdp.grads + fsdp.optimizer == pytest.approx(
            numel * (bytes_.weights + bytes_.grads + bytes_.optim) / 8
        )
        assert fsdp_ckpt.total < fsdp.total < ddp.total
        rows.append(
            f"{name:>5} {numel / 1e9:6.2f}B  ddp {ddp.total_gb:6.1f} GB   fsdp {fsdp.total_gb:6.1f} GB   "
            f"fsdp+ckpt {fsdp_ckpt.total_gb:6.1f} GB"
        )
    with capsys.disabled():
        print(f"\nmemory per GPU, {precision}, 8 GPUs, micro-batch 1 x max_seq_len, AdamW:")
        print("\n".join(rows))
    # the 7b preset: DDP does not fit an 80 GB GPU (bf16-mixed: 22 bytes a parameter; bf16-true: 10, and
    # 12 at the optimizer step), FSDP over 8 does
    cfg = preset("7b")
    kw = dict(num_gpus=8, precision=precision, seq_len=4096, batch_size=1, gpu_memory_gb=80)
    assert not memory_per_gpu(cfg, strategy="ddp", activation_checkpointing=True, **kw).fits
    assert memory_per_gpu(cfg, strategy="fsdp", activation_checkpointing=True, **kw).fits
