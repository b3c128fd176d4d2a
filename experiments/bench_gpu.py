"""GPU training throughput table: 125m and 1b at seq 2048 and 4096, bf16 eager / compiled / compiled + fused
CE / FP8 (compiled, fused CE); tokens/s, MFU, peak memory, optimizer step time, first-step (compile) time.

Each row runs llmforge's own pieces in one process, without Lightning: `CausalLM` (its ``loss``: plain head
or chunked ``fused_ce``), ``configure_model`` (float8 conversion, per-block ``torch.compile``), AdamW with
the kernel the trainer picks (`adamw_kernel`: fused on CUDA), bf16 autocast, gradient clipping at 1.0 as
the trainer default, random tokens. No activation checkpointing; batch sizes fill an H200 (141 GB) per
``llmforge.estimate`` for the plain path; a batch that runs out of memory is halved once.

    MFU = flops_per_token x tokens/s / peak;  flops_per_token = 6 N + 12 L d seq  (PaLM; N: matmul params)

with the dense bf16 peak (989 TFLOP/s for H100/H200 SXM) for every row, FP8 included. Rows run in order of
importance while they fit in ``--budget`` seconds (a row is skipped when the longest row of its model so far
would end past it); the rest print as skipped. ``--json`` is rewritten after every row.

    python experiments/bench_gpu.py                        # on a GPU: the whole table
    python experiments/bench_gpu.py --dry                  # CPU, tiny model, 2 steps: checks the script
    python experiments/bench_gpu.py --rows 1b:4096:compiled --steps 20
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name: (torch.compile, fused CE, FP8)
    "eager": (False, False, False),
    "compiled": (True, False, False),
    "compiled+fusedce": (True, True, False),
    "fp8": (True, True, True),
}
BATCH = {("125m", 2048): 32, ("125m", 4096): 16, ("1b", 2048): 16, ("1b", 4096): 8}
# fmt: off
ORDER = [  # the targets first: 1b seq 4096 bf16 and FP8, 125m seq 2048 bf16
    "1b:4096:compiled+fusedce", "1b:4096:fp8", "125m:2048:compiled+fusedce", "1b:4096:eager",
    "1b:4096:compiled", "125m:2048:eager", "125m:2048:compiled", "125m:2048:fp8",
    "1b:2048:eager", "1b:2048:compiled", "1b:2048:compiled+fusedce", "1b:2048:fp8",
    "125m:4096:eager", "125m:4096:compiled", "125m:4096:compiled+fusedce", "125m:4096:fp8",
]
# fmt: on


# The rows `llmforge.estimate` takes its default MFU from (llmforge/estimate/cost.py MEASURED_MFU): the 1b
# at seq 4096 in the trainer's default GPU configuration, per precision.
MEASURED_ROWS = {"bf16-mixed": ("1b", 4096, "compiled+fusedce"), "fp8-mixed": ("1b", 4096, "fp8")}
GPU_KEYS = {"H200": "h200", "H100": "h100", "A100": "a100"}  # device name -> conf/estimate.yaml's gpus key


@dataclass
class Row:
    model: str
    seq: int
    variant: str
    batch: int = 0
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    peak_gib: float = 0.0
    optim_ms: float = 0.0
    step_ms: float = 0.0
    first_step_s: float = 0.0
    note: str = ""


def preset(name: str, seq: int) -> dict:
    import yaml

    fields = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    fields.pop("name", None)
    fields["max_seq_len"] = max(seq, fields.get("max_seq_len") or 0)
    return fields


def measure(row: Row, args: argparse.Namespace, device: torch.device) -> Row:
    from llmforge.models.transformer import TransformerConfig, flops_per_token
    from llmforge.objectives.base import adamw_kernel, param_groups
    from llmforge.objectives.clm import CausalLM

    compile_, fused, fp8 = VARIANTS[row.variant]
    compile_ = compile_ and not args.dry
    model = TINY if args.dry else preset(row.model, row.seq)
    torch.manual_seed(0)
    module = CausalLM(model, {"lr": 3e-4}, {"pad": 0}, fused_ce=fused).to(device)
    module.compile_blocks, module.float8 = compile_, fp8
    module.configure_model()
    groups = param_groups(module.model, 0.1)
    opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), **adamw_kernel(groups, "bf16-mixed"))
    vocab = model["vocab_size"]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (row.batch, row.seq + 1), generator=g).to(device)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    optim_s: list[float] = []

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = module.loss(batch)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            optim_s.append((start, end))
        else:
            t = time.perf_counter()
            opt.step()
            optim_s.append(time.perf_counter() - t)
        opt.zero_grad(set_to_none=True)

    t = time.perf_counter()
    step()
    sync()
    row.first_step_s = time.perf_counter() - t
    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    optim_s.clear()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - t
    n_tokens = row.batch * row.seq * args.steps
    row.tokens_per_s = n_tokens / elapsed
    row.step_ms = 1e3 * elapsed / args.steps
    ms = [s.elapsed_time(e) for s, e in optim_s] if cuda else [1e3 * s for s in optim_s]
    row.optim_ms = sorted(ms)[len(ms) // 2]
    per_token = flops_per_token(TransformerConfig(**model), row.seq)
    row.mfu = per_token * row.tokens_per_s / (args.peak_tflops * 1e12)
    if cuda:
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return row


TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=128)


def run_row(spec: str, args: argparse.Namespace, device: torch.device) -> Row:
    model, seq, variant = spec.split(":")
    seq = 64 if args.dry else int(seq)
    row = Row(model, seq, variant, batch=2 if args.dry else BATCH[(model, seq)])
    if VARIANTS[variant][2]:
        from llmforge.fp8 import unsupported_reason

        reason = unsupported_reason(device.type)
        if reason:
            row.note = reason.split(":")[0]
            return row
    if VARIANTS[variant][0] and args.dry:
        row.note = "--dry: not compiled"
    for attempt in range(2):
        try:
            return measure(row, args, device)
        except torch.OutOfMemoryError:
            row.note = f"OOM at batch {row.batch}"
            row.batch //= 2
            if attempt == 1 or row.batch == 0:
                return row
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return row


def table(rows: list[Row], peak_tflops: float) -> str:
    head = (
        f"{'model':<6}{'seq':>6} {'variant':<18}{'batch':>6}{'tokens/s':>11}{'MFU':>7}{'peak GiB':>10}"
        f"{'optim ms':>10}{'step ms':>9}{'1st step s':>11}  note"
    )
    lines = [head]
    for r in rows:
        if r.tokens_per_s:
            lines.append(
                f"{r.model:<6}{r.seq:>6} {r.variant:<18}{r.batch:>6}{r.tokens_per_s:>11.0f}"
                f"{100 * r.mfu:>6.1f}%{r.peak_gib:>10.1f}{r.optim_ms:>10.1f}{r.step_ms:>9.0f}"
                f"{r.first_step_s:>11.1f}  {r.note}"
            )
        else:
            lines.append(f"{r.model:<6}{r.seq:>6} {r.variant:<18}{r.batch:>6}{'-':>11}  {r.note}")
    lines.append(
        f"MFU = flops_per_token x tokens/s / {peak_tflops:.0f}e12 (dense bf16 peak, every row); "
        "flops_per_token = 6N + 12 x n_layers x d_model x seq (PaLM)"
    )
    return "\n".join(lines)


def measured_mfu(rows: list[Row], device_name: str) -> dict[str, dict[str, float]]:
    """The MEASURED_MFU entry (llmforge.estimate.cost) of this run: {gpu: {precision: MFU}}, from the
    MEASURED_ROWS that ran; empty for a GPU type the estimate does not know."""
    gpu = next((key for name, key in GPU_KEYS.items() if name in device_name.upper()), None)
    found = {
        precision: round(r.mfu, 3)
        for precision, spec in MEASURED_ROWS.items()
        for r in rows
        if (r.model, r.seq, r.variant) == spec and r.tokens_per_s
    }
    return {gpu: found} if gpu and found else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ORDER), help="model:seq:variant,... (in this order)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=float, default=330.0, help="seconds; later rows are skipped")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    p.add_argument("--dry", action="store_true", help="CPU, a tiny model, 2 steps: checks the script")
    p.add_argument("--json", type=Path, default=None, help="write the rows here too")
    args = p.parse_args()
    if args.dry:
        args.steps, args.warmup = 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry else "cpu")
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows: list[Row] = []
    cost: dict[str, float] = {}  # model -> the longest row of it so far, seconds
    start = time.perf_counter()
    for spec in args.rows.split(","):
        model, seq, variant = spec.split(":")
        if variant not in VARIANTS:
            raise SystemExit(f"--rows: unknown variant {variant!r} (one of {', '.join(VARIANTS)})")
        if time.perf_counter() - start + cost.get(model, 0.0) > args.budget:  # would end past the budget
            rows.append(Row(model, int(seq), variant, note="skipped: time budget"))
            continue
        began = time.perf_counter()
        rows.append(run_row(spec, args, device))
        cost[model] = max(cost.get(model, 0.0), time.perf_counter() - began)
        r = rows[-1]
        print(f"  {spec}: {r.tokens_per_s:.0f} tokens/s {100 * r.mfu:.1f}% {r.note}", flush=True)
        if args.json:  # after every row: a run stopped from outside keeps what it measured
            write_json(args.json, rows, name)
    print(table(rows, args.peak_tflops))
    print(
        f"MEASURED_MFU entry (llmforge/estimate/cost.py; the ledger row first): "
        f"{json.dumps(measured_mfu(rows, name))}"
    )
    if args.json:
        write_json(args.json, rows, name)


def write_json(path: Path, rows: list[Row], device_name: str) -> None:
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "measured_mfu": measured_mfu(rows, device_name),
    }
    path.write_text(json.dumps({**result, "rows": [r.__dict__ for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
