"""Hugging Face interop: the causal LM as a `LlamaForCausalLM` directory, and back.

- `to_hf(model, tokenizer_path, out_dir)`: a `Transformer` (or its `CausalLM` module) -> ``config.json``
  (LlamaConfig), ``model.safetensors``, ``generation_config.json`` and, given the data's
  ``tokenizer.json``, the tokenizer files ``PreTrainedTokenizerFast`` / ``AutoTokenizer`` load.
- `from_hf(dir)` -> (`TransformerConfig`, state dict in llmforge's names): a local Llama directory
  (``model.safetensors``, sharded ``model.safetensors.index.json`` or ``pytorch_model.bin``).

Reading llmforge's own checkpoints (and ``init_from=``, ``python -m llmforge.export``) is
`llmforge.checkpoints`; this module only converts between the two formats.

The layouts agree without any permutation: llmforge applies RoPE in Llama's "rotate half" layout
(`llmforge.models.transformer.apply_rope`: the first and second halves of each head are the pairs) with
the same frequencies, as Hugging Face's ``LlamaAttention`` does, so Q and K need no reordering (the
interleaved-pairs permutation of Meta's ``convert_llama_weights_to_hf`` is for Meta's original layout).
The fused QKV and gate/up projections split into ``q_proj/k_proj/v_proj`` and ``gate_proj/up_proj``;
grouped-query K/V heads repeat the same way in both (query head i reads K/V head i // group).
Only safetensors and json are needed here; transformers only to load the result.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmforge.models.transformer import TransformerConfig

# llmforge's tokenizer (llmforge.prep.tokenizer): name in the shard manifest -> token text
SPECIAL_TEXT = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>", "mask": "<mask>"}
LLMFORGE_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}


# -- names and shapes --------------------------------------------------------------------------------------
def to_hf_state_dict(cfg: TransformerConfig, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llmforge `Transformer` state dict -> LlamaForCausalLM names (fused matrices split)."""
    d, kv, f = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.hidden
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    for i in range(cfg.n_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[p + "attn.qkv.weight"].split([d, kv, kv], dim=0)
        gate, up = sd[p + "mlp.gate_up.weight"].split([f, f], dim=0)
        out |= {
            q + "input_layernorm.weight": sd[p + "attn_norm.weight"],
            q + "self_attn.q_proj.weight": wq,
            q + "self_attn.k_proj.weight": wk,
            q + "self_attn.v_proj.weight": wv,
            q + "self_attn.o_proj.weight": sd[p + "attn.out.weight"],
            q + "post_attention_layernorm.weight": sd[p + "mlp_norm.weight"],
            q + "mlp.gate_proj.weight": gate,
            q + "mlp.up_proj.weight": up,
            q + "mlp.down_proj.weight": sd[p + "mlp.down.weight"],
        }
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: TransformerConfig, hf: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM state dict -> llmforge `Transformer` names (q/k/v and gate/up fused)."""
    hf = {k.removeprefix("module."): v for k, v in hf.items()}
    missing = [
        k
        for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight")
        if k not in hf
    ]
    if missing:
        raise ValueError(f"not a Llama state dict: missing {missing} (has e.g. {sorted(hf)[:4]})")
    sd = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if not cfg.tie_embeddings and "lm_head.weight" not in hf:
        raise ValueError("tie_word_embeddings=false but the checkpoint has no lm_head.weight")
    # tied: the head is the embedding (the module's state dict lists both names for the one tensor)
    sd["head.weight"] = hf["model.embed_tokens.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        a, m = q + "self_attn.", q + "mlp."
        sd |= {
            p + "attn_norm.weight": hf[q + "input_layernorm.weight"],
            p + "attn.qkv.weight": torch.cat(
                [hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"]]
            ),
            p + "attn.out.weight": hf[a + "o_proj.weight"],
            p + "mlp_norm.weight": hf[q + "post_attention_layernorm.weight"],
            p + "mlp.gate_up.weight": torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]]),
            p + "mlp.down.weight": hf[m + "down_proj.weight"],
        }
    return sd


def hf_config(
    cfg: TransformerConfig, special_ids: Mapping[str, int] | None = None, dtype: str = "float32"
) -> dict[str, Any]:
    """config.json of the LlamaForCausalLM equivalent of `cfg`. ``rope_theta`` is written both ways:
    top-level (transformers 4.x) and in ``rope_parameters`` (transformers 5)."""
    ids = dict(LLMFORGE_IDS if special_ids is None else special_ids)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("pad"),
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def config_from_hf(hf: Mapping[str, Any], name: str = "hf") -> TransformerConfig:
    """TransformerConfig from a Llama config.json; features llmforge's block lacks raise ValueError."""
    if hf.get("model_type") != "llama":
        raise ValueError(
            f"model_type={hf.get('model_type')!r}: only Llama checkpoints (model_type=llama) load"
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    checks = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(hf.get("attention_bias", False)), False),
        "mlp_bias": (bool(hf.get("mlp_bias", False)), False),
        "rope_type": (rope_type, "default"),
    }
    for key, (value, wanted) in checks.items():
        if value != wanted:
            raise ValueError(
                f"{key}={value!r} is not supported (llmforge's Llama block has {key}={wanted!r})"
            )
    heads, d = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, d // heads):
        raise ValueError(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads = {d // heads}")
    kv = hf.get("num_key_value_heads") or heads
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return TransformerConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=None if kv == heads else kv,
        ffn_hidden=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


# -- export ------------------------------------------------------------------------------------------------
def to_hf(
    model: nn.Module,
    tokenizer_path: str | Path | None,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `model` (a `Transformer`, or a module whose ``.model`` is one) as a Hugging Face Llama dir."""
    from llmforge.models.transformer import Encoder, Transformer

    net = getattr(model, "model", model)
    if not isinstance(net, Transformer) or isinstance(net, Encoder):
        raise ValueError(
            f"only the causal LM (objective=clm, llmforge Transformer) exports as LlamaForCausalLM, "
            f"not {type(net).__name__}"
        )
    return export_state_dict(net.cfg, net.state_dict(), tokenizer_path, out_dir, dtype=dtype)


def export_state_dict(
    cfg: TransformerConfig,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer_path: str | Path | None,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
) -> Path:
    from safetensors.torch import save_file

    if cfg.width_mult != 1.0:
        raise ValueError(
            f"a µP model (model.mup=true, d_model={cfg.d_model} != mup_base_width={cfg.mup_base_width}) "
            "scales its logits and attention scores in ways a Llama config cannot express: not exported"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = LLMFORGE_IDS
    if tokenizer_path is not None:
        special = write_tokenizer(tokenizer_path, out, cfg.max_seq_len)
    tensors = {k: v.to(dtype) for k, v in to_hf_state_dict(cfg, state_dict).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    dtype_name = str(dtype).removeprefix("torch.")
    _write_json(out / "config.json", hf_config(cfg, special, dtype_name))
    generation = {k + "_token_id": special.get(k) for k in ("bos", "eos", "pad")}
    _write_json(out / "generation_config.json", generation)
    return out


def write_tokenizer(tokenizer_path: str | Path, out: Path, max_len: int) -> dict[str, int]:
    """Copy tokenizer.json and write the files `AutoTokenizer` reads; returns the special token ids."""
    from tokenizers import Tokenizer

    src = Path(tokenizer_path)
    if not src.is_file():
        raise FileNotFoundError(f"tokenizer {src}: no such file")
    tok = Tokenizer.from_file(str(src))
    ids = {name: tok.token_to_id(text) for name, text in SPECIAL_TEXT.items()}
    present = {name: i for name, i in ids.items() if i is not None}
    shutil.copyfile(src, out / "tokenizer.json")
    tokens = {f"{name}_token": SPECIAL_TEXT[name] for name in present}
    _write_json(out / "special_tokens_map.json", tokens)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_len,
            "clean_up_tokenization_spaces": False,
            **tokens,
        },
    )
    return present


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# -- import --------------------------------------------------------------------------------------------------
def from_hf(path: str | Path) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """A local Hugging Face Llama directory -> (config, state dict in llmforge `Transformer` names)."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not a Hugging Face model directory (no config.json)")
    cfg = config_from_hf(json.loads((d / "config.json").read_text()), name=d.name)
    return cfg, from_hf_state_dict(cfg, _read_weights(d))


def _read_weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(d / f)).items()}
    if (d / "pytorch_model.bin").is_file():
        from llmforge.checkpoints import safe_load  # weights_only: a refused file is named in one line

        return safe_load(d / "pytorch_model.bin")
    raise FileNotFoundError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
