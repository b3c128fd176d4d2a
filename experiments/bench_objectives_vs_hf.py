#!/usr/bin/env python
"""Steady-state CPU training throughput of the MLM and denoising models vs Hugging Face, side by side.

- ``mlm``: llmforge ``Encoder`` (MLM head on the masked positions only, as ``objective=mlm`` trains it)
  vs ``BertForMaskedLM``;
- ``denoise``: llmforge ``EncoderDecoder`` vs ``T5ForConditionalGeneration`` on T5 span corruption.

Matched dimensions: vocabulary, d_model, layers (encoder and decoder), heads and head size, untied output
head, and the same MLP parameter count: our SwiGLU hidden h (three d x h matrices) against BERT's GELU
intermediate 3h/2 (two matrices: with h = 8d/3 that is BERT's own 4d) and T5 v1.1's gated MLP with
d_ff = h and SiLU (three matrices, the same shape as ours). HF models use ``attn_implementation="sdpa"``
and no dropout. Both sides train on the SAME batches, made by llmforge's own collators
(``mlm_collate``, ``span_corruption_collate``) from random windows, with the same loss (fp32 cross-entropy
over the scored tokens, computed outside the model) and the same optimizer (torch AdamW over llmforge's
``param_groups``: weight decay on matmul weights only).

Tokens/s counts source tokens (``batch x seq_len`` per step, as ``llmforge.callbacks.Throughput`` does),
the same for both sides, so the ratio is the speed ratio. Absolute CPU figures drift ~14% between
processes (docs/architecture.md): all models live in one process and are timed in alternating rounds (the
side that goes first alternates too) after warm-up steps; the figure is the median over rounds
(`experiments/_hf_bench.py`).

    .venv/bin/python experiments/bench_objectives_vs_hf.py                       # both, fp32 and bf16
    .venv/bin/python experiments/bench_objectives_vs_hf.py --objective mlm --dtype bf16 --rounds 7
    .venv/bin/python experiments/bench_objectives_vs_hf.py --dense-head          # MLM head on all tokens
    .venv/bin/python experiments/bench_objectives_vs_hf.py --profile 3           # + torch.profiler tables
    .venv/bin/python experiments/bench_objectives_vs_hf.py --ledger              # + rows in LEDGER.md
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _hf_bench import Side, add_common_args, profile, setup, timed_rounds
from torch import nn

from llmforge.models.transformer import Encoder, EncoderDecoder, TransformerConfig, num_params
from llmforge.objectives.denoise import span_corruption_collate, span_counts
from llmforge.objectives.mlm import mlm_collate

ROOT = Path(__file__).resolve().parent.parent
PAD, BOS, EOS, MASK, FIRST_SENTINEL, N_SPECIAL = 0, 2, 3, 4, 5, 105


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, rounds=6)
    p.add_argument("--objective", choices=["mlm", "denoise", "both"], default="both")
    p.add_argument("--layers", type=int, default=6, help="encoder layers (and decoder layers for denoise)")
    p.add_argument("--dense-head", action="store_true",
                   help="MLM: run our head on every position, as BERT does (isolates the sparse-head gain)")
    p.add_argument("--ledger", action="store_true", help="append the results to experiments/LEDGER.md")
    return p.parse_args(argv)


def our_config(args: argparse.Namespace, tie_embeddings: bool = False) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        max_seq_len=max(args.seq_len, 512),
        tie_embeddings=tie_embeddings,
    )


# -- batches ---------------------------------------------------------------------------------------------
def windows(args: argparse.Namespace, rng: np.random.Generator, first_index: int) -> list[dict]:
    tokens = rng.integers(N_SPECIAL, args.vocab, size=(args.batch, args.seq_len + 1))
    tokens[rng.random(tokens.shape) < 0.01] = EOS  # document ends, as in packed shards
    return [{"index": first_index + i, "tokens": t} for i, t in enumerate(tokens)]


def make_batches(args: argparse.Namespace, objective: str, n: int = 4) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    specials = np.arange(N_SPECIAL)
    out = []
    for k in range(n):
        samples = windows(args, rng, k * args.batch)
        if objective == "mlm":
            out.append(mlm_collate(samples, seed=args.seed, mask_id=MASK, pad_id=PAD, special_ids=specials,
                                   random_ids=np.arange(N_SPECIAL, args.vocab)))
        else:
            sentinels = np.arange(FIRST_SENTINEL, N_SPECIAL)
            out.append(span_corruption_collate(samples, seed=args.seed, sentinel_ids=sentinels, eos_id=EOS,
                                               pad_id=PAD, start_id=BOS))
    return out


# -- models --------------------------------------------------------------------------------------------
def build_bert(cfg: TransformerConfig, args: argparse.Namespace) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    hf_cfg = BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=3 * cfg.hidden // 2,  # two matrices of 3h/2 = our three of h
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=max(args.seq_len, 512),
        type_vocab_size=1,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return BertForMaskedLM(hf_cfg)


def build_t5(cfg: TransformerConfig, args: argparse.Namespace) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    hf_cfg = T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.head_dim,
        d_ff=cfg.hidden,
        num_layers=cfg.n_layers,
        num_decoder_layers=cfg.decoder_layers,
        num_heads=cfg.n_heads,
        feed_forward_proj="gated-silu",  # T5 v1.1's gated MLP with SwiGLU's activation: our shape
        dropout_rate=0.0,
        tie_word_embeddings=False,
        decoder_start_token_id=BOS,
        pad_token_id=PAD,
        eos_token_id=EOS,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return T5ForConditionalGeneration(hf_cfg)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def mlm_sides(args: argparse.Namespace, bf16: bool) -> list[Side]:
    cfg = our_config(args)
    torch.manual_seed(args.seed)
    ours = Encoder(cfg)
    hf = build_bert(cfg, args)

    def ours_loss(model, batch):
        if args.dense_head:
            return model(batch["input_ids"]), batch["labels"]
        positions = batch["mlm_positions"]
        return model(batch["input_ids"], positions=positions), batch["labels"].flatten()[positions]

    def hf_loss(model, batch):
        return model(input_ids=batch["input_ids"]).logits, batch["labels"]

    print(f"parameters: llmforge Encoder {count(ours):,} (num_params {num_params(cfg, arch='encoder'):,}), "
          f"BertForMaskedLM {count(hf):,} (+ biases, LayerNorm shifts, positions, MLM transform)")
    print(f"HF attn_implementation={hf.config._attn_implementation!r}, intermediate_size="
          f"{hf.config.intermediate_size} (ours SwiGLU hidden {cfg.hidden}); our head on "
          f"{'every position' if args.dense_head else 'the masked positions only'}")
    return [Side("llmforge", ours, ours_loss, args, bf16), Side("HF BERT", hf, hf_loss, args, bf16)]


def denoise_sides(args: argparse.Namespace, bf16: bool) -> list[Side]:
    cfg = our_config(args, tie_embeddings=True)  # transformers >= 5 always ties T5's head to its embedding
    torch.manual_seed(args.seed)
    ours = EncoderDecoder(cfg)
    hf = build_t5(cfg, args)

    def ours_loss(model, batch):
        return model(batch["input_ids"], batch["decoder_input_ids"]), batch["labels"]

    def hf_loss(model, batch):
        out = model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"])
        return out.logits, batch["labels"]

    exact = num_params(cfg, arch="encdec")
    print(f"parameters: llmforge EncoderDecoder {count(ours):,} (num_params {exact:,}), "
          f"T5ForConditionalGeneration {count(hf):,} (+ relative position biases); both heads tied")
    print(f"HF attn_implementation={hf.config._attn_implementation!r}, d_ff={hf.config.d_ff}, "
          f"feed_forward_proj={hf.config.feed_forward_proj!r}")
    return [Side("llmforge", ours, ours_loss, args, bf16), Side("HF T5", hf, hf_loss, args, bf16)]


# -- the benchmark -------------------------------------------------------------------------------------
def bench(args: argparse.Namespace, objective: str, dtype: str) -> dict:
    batches = make_batches(args, objective)
    shape = "x".join(str(s) for s in batches[0]["input_ids"].shape)
    if objective == "denoise":
        shape += f" -> {'x'.join(str(s) for s in batches[0]['labels'].shape)}"
        noise, spans = span_counts(args.seq_len, 0.15, 3.0)
        shape += f" ({noise} noise tokens in {spans} spans)"
    print(f"\n=== {objective} {dtype}: batch {args.batch} x seq_len {args.seq_len} = "
          f"{args.batch * args.seq_len} source tokens/step, inputs {shape}; {args.warmup} warm-up + "
          f"{args.rounds} rounds x {args.steps} steps per model ===")
    sides = (mlm_sides if objective == "mlm" else denoise_sides)(args, dtype == "bf16")
    result = {"objective": objective, "dtype": dtype, "hf_name": sides[1].name}
    result |= timed_rounds(sides, batches, args)
    if args.profile:
        profile(sides, batches, args.profile)
    del sides
    gc.collect()
    return result


def append_ledger(args: argparse.Namespace, results: list[dict]) -> None:
    """Append one row per result to experiments/LEDGER.md (created with its header if absent)."""
    ledger = ROOT / "experiments" / "LEDGER.md"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    argv = [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]
    command = "python " + " ".join(shlex.quote(a) for a in argv)
    header = "| date | commit | command | result |\n|---|---|---|---|\n"  # the ledger's table
    dims = (f"d {args.d_model}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, "
            f"batch {args.batch} x seq {args.seq_len}, {torch.get_num_threads()} threads")
    rows = []
    for r in results:
        what = f"{r['objective']} {r['dtype']}: training tokens/s vs {r['hf_name']} ({dims}"
        what += ", dense MLM head)" if r["objective"] == "mlm" and args.dense_head else ")"
        result = (f"{what}: llmforge {r['ours']:.0f}, {r['hf_name']} {r['hf']:.0f}, "
                  f"ratio **{r['ratio']:.2f}** (paired {r['paired']:.2f}, CPU time {r['cpu_ratio']:.2f})")
        rows.append(f"| {time.strftime('%Y-%m-%d')} | {commit} | `{command}` | {result} |\n")
    with open(ledger, "a") as f:  # append only: other benchmarks write here too
        if f.tell() == 0:
            f.write(header)
        f.writelines(rows)
    print(f"\nappended {len(rows)} rows to {ledger}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup(args)
    objectives = ["mlm", "denoise"] if args.objective == "both" else [args.objective]
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    results = [bench(args, o, d) for o in objectives for d in dtypes]
    print(f"\n{'objective':<10} {'dtype':<6} {'llmforge tok/s':>15} {'HF tok/s':>10} {'HF model':<9} "
          f"{'ratio':>6} {'paired':>7} {'cpu-time':>9}")
    for r in results:
        print(f"{r['objective']:<10} {r['dtype']:<6} {r['ours']:15.0f} {r['hf']:10.0f} {r['hf_name']:<9} "
              f"{r['ratio']:6.2f} {r['paired']:7.2f} {r['cpu_ratio']:9.2f}")
    if args.ledger:
        append_ledger(args, results)


if __name__ == "__main__":
    main()
