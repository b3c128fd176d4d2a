#!/usr/bin/env python
"""Generation tokens/s on CPU: llmforge with its KV cache, without it, and Hugging Face ``generate``.

One llmforge ``Transformer`` (random weights, fixed seed) is exported with `llmforge.hf.to_hf` to a Hugging
Face Llama directory and loaded back as ``LlamaForCausalLM`` (sdpa attention): the same weights on both
sides. The same settings everywhere: greedy, the same batch of prompts of the same length, the same number of
new tokens (no EOS stop: HF gets ``min_new_tokens`` = ``max_new_tokens``), fp32, ``use_cache=True`` for HF.
The three sides' greedy tokens are compared before timing (they must agree).

tokens/s = batch * new tokens / wall time of the whole ``generate`` call (prefill included). Sides run in
alternating rounds in one process (the first side rotates; CPU figures drift between processes); the
figure is the median over rounds, with the median of per-round ratios. Tokens per CPU second (process CPU
time) is printed beside it: on a shared, oversubscribed machine wall time swings several-fold, CPU time
much less (``--threads 1`` makes it the cleanest figure).

    .venv/bin/python experiments/bench_generate.py                       # defaults below
    .venv/bin/python experiments/bench_generate.py --batch 1 --prompt-len 16 --new-tokens 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmforge.inference import generate_ids  # noqa: E402
from llmforge.models.transformer import Transformer, TransformerConfig, num_params  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-uncached", action="store_true", help="skip the (slow) no-cache side")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from llmforge.hf import to_hf

    cfg = TransformerConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        ffn_hidden=args.ffn,
        max_seq_len=max(1024, args.prompt_len + args.new_tokens),
    )
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        to_hf(ours, None, tmp)
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").eval()
    hf.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(5, args.vocab, (args.batch, args.prompt_len), generator=g)
    n = args.new_tokens

    def run_ours(cache: bool) -> list[list[int]]:
        return generate_ids(ours, prompts.tolist(), n, use_cache=cache)

    @torch.no_grad()
    def run_hf() -> list[list[int]]:
        out = hf.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,
        )
        return out[:, args.prompt_len :].tolist()

    sides = {"llmforge kv-cache": lambda: run_ours(True), "hf generate": run_hf}
    if not args.no_uncached:
        sides["llmforge no-cache"] = lambda: run_ours(False)
    print(
        f"model: {num_params(cfg) / 1e6:.1f}M params (vocab {args.vocab}, d {args.d_model}, "
        f"{args.layers} layers, {args.heads} heads, ffn {args.ffn}), fp32, batch {args.batch}, "
        f"prompt {args.prompt_len}, {n} new tokens, greedy, {args.threads} threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    reference = None
    for name, fn in sides.items():  # warm-up and agreement
        tokens = fn()
        reference = reference or tokens
        agree = sum(
            a == b for ra, rb in zip(tokens, reference, strict=True) for a, b in zip(ra, rb, strict=True)
        )
        print(f"  warm-up {name}: {agree}/{args.batch * n} tokens equal to llmforge kv-cache")
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            sides[name]()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(
            f"  round {r}: "
            + ", ".join(
                f"{k} {args.batch * n / times[k][-1]:.0f} tok/s ({cpu[k][-1]:.2f} CPU s)" for k in names
            )
        )
    rate = {k: args.batch * n / statistics.median(v) for k, v in times.items()}
    cpu_rate = {k: args.batch * n / statistics.median(v) for k, v in cpu.items()}
    print("median tokens/s, wall:", ", ".join(f"{k} {v:.0f}" for k, v in rate.items()))
    print("median tokens per CPU second:", ", ".join(f"{k} {v:.0f}" for k, v in cpu_rate.items()))
    ours, hf_name = "llmforge kv-cache", "hf generate"
    paired = statistics.median(h / o for o, h in zip(times[ours], times[hf_name], strict=True))
    print(
        f"ratio llmforge kv-cache / hf generate: wall {rate[ours] / rate[hf_name]:.2f} "
        f"(paired per round {paired:.2f}), CPU time {cpu_rate[ours] / cpu_rate[hf_name]:.2f}"
    )
    if "llmforge no-cache" in rate:
        nc = "llmforge no-cache"
        print(
            f"ratio kv-cache / no-cache: wall {rate[ours] / rate[nc]:.2f}, "
            f"CPU time {cpu_rate[ours] / cpu_rate[nc]:.2f}"
        )


if __name__ == "__main__":
    main()
