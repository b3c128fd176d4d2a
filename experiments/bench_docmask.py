"""Document masking (``data.document_mask``): training tokens/s with vs without it, in one process.

The same decoder (CLM) or encoder (MLM), weights, optimizer and batch, with two kinds of step alternated
round by round: the packed window as one sequence (causal / no mask, the fast fused SDPA kernels), and
with the document mask (block-diagonal, from the EOS positions, RoPE positions reset per document: a dense
boolean mask passed to SDPA on CPU; a flex-attention block mask on CUDA). Documents are drawn with
geometric lengths (mean ``--doc-len`` tokens) and packed into windows of ``--seq-len``. Reports the median
wall and thread-CPU time per step of each side and their ratio (target >= 0.9 at seq 256 on CPU). With
``--device cuda`` the masked side runs flex attention (compiled, block masks) against SDPA's causal/no-mask
flash kernels; only the wall ratio means anything there (the CPU time is the host's).

    python experiments/bench_docmask.py [--seq-len 256 --batch 8 --rounds 5 --steps 3 --dtype both]
    python experiments/bench_docmask.py --device cuda --seq-len 2048 --batch 8 --d-model 1024 --layers 8 \
        --heads 16 --doc-len 400 --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from llmforge.models.transformer import Encoder, Transformer, TransformerConfig
from llmforge.objectives.base import param_groups
from llmforge.objectives.clm import clm_collate

EOS, PAD = 3, 0


def windows(batch: int, seq_len: int, doc_len: float, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(batch):
        stream: list[int] = []
        while len(stream) < seq_len + 1:
            n = int(rng.geometric(1 / doc_len))
            stream += list(rng.integers(16, vocab, size=n)) + [EOS]
        out.append({"index": i, "tokens": np.array(stream[: seq_len + 1], dtype=np.int64)})
    return out


def step_fn(model, optimizer, batch: dict, masked: bool, bf16: bool):
    kw = {}
    if masked:
        if isinstance(model, Encoder):
            kw = {"position_ids": batch["position_ids"], "doc_ids": batch["doc_ids"]}
        else:
            kw = {"positions": batch["position_ids"], "doc_ids": batch["doc_ids"]}

    def step() -> None:
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch["input_ids"], **kw)
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, n: int) -> tuple[float, float]:
    sync()
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - wall) / n, (time.thread_time() - cpu) / n


def bench(arch: str, bf16: bool, args) -> dict:
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        max_seq_len=2048,
    )
    model = (Encoder if arch == "mlm" else Transformer)(cfg).to(args.device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    batch = clm_collate(
        windows(args.batch, args.seq_len, args.doc_len, args.vocab),
        pad_id=PAD,
        document_eos_id=EOS,
        reset_positions=True,
    )
    batch = {k: v.to(args.device) for k, v in batch.items()}
    steps = {name: step_fn(model, optimizer, batch, name == "masked", bf16) for name in ("plain", "masked")}
    for step in steps.values():  # warm-up
        timed(step, 2)
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "masked": []}
    for r in range(args.rounds):
        order = ("plain", "masked") if r % 2 == 0 else ("masked", "plain")
        for name in order:
            times[name].append(timed(steps[name], args.steps))
    tokens = args.batch * args.seq_len
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()
    }
    docs = int((batch["position_ids"] == 0).sum())
    return {
        "arch": arch,
        "dtype": "bf16" if bf16 else "fp32",
        "docs_per_window": docs / args.batch,
        "plain_tok_s": tokens / med["plain"][0],
        "masked_tok_s": tokens / med["masked"][0],
        "ratio_wall": med["plain"][0] / med["masked"][0],
        "ratio_cpu": med["plain"][1] / med["masked"][1],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--doc-len", type=float, default=100.0, help="mean document length (geometric)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--arch", choices=["clm", "mlm", "both"], default="both")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the document mask as flex attention)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = [False, True] if args.dtype == "both" else [args.dtype == "bf16"]
    archs = ["clm", "mlm"] if args.arch == "both" else [args.arch]
    print(
        f"seq {args.seq_len}, batch {args.batch}, d {args.d_model}, {args.layers} layers, "
        f"{args.threads} thread(s), {args.device}"
    )
    for arch in archs:
        for bf16 in dtypes:
            r = bench(arch, bf16, args)
            print(
                f"{r['arch']} {r['dtype']}: {r['docs_per_window']:.1f} documents per window; tokens/s "
                f"without mask {r['plain_tok_s']:.0f}, with {r['masked_tok_s']:.0f}: "
                f"ratio {r['ratio_wall']:.3f} (CPU time {r['ratio_cpu']:.3f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
