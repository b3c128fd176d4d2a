"""Measured peak memory of real training steps on CPU vs `llmforge.estimate.memory_per_gpu` (one device).

Each case runs in a fresh process: build the model, fused AdamW, two optimizer steps on random tokens; the
peak is the growth of the process's peak resident set (ru_maxrss) over its size before the model existed.
CPU RSS also holds allocator slack, so this checks the estimate's scale, not its last digit.

    python experiments/check_memory_estimate.py            # prints one row per case and the ratio
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = [  # (preset overrides, precision, activation checkpointing, batch, seq, fused CE head)
    ({"n_layers": 6}, "32-true", False, 4, 512, False),
    ({"n_layers": 6}, "32-true", True, 4, 512, False),
    ({"n_layers": 6}, "bf16-mixed", False, 4, 512, False),
    ({"n_layers": 6}, "bf16-true", False, 4, 512, False),
    ({"n_layers": 6}, "32-true", False, 4, 512, True),
    ({"n_layers": 6}, "32-true", True, 4, 512, True),
    ({"n_layers": 6}, "bf16-mixed", False, 4, 512, True),
    ({"n_layers": 6}, "bf16-true", False, 4, 512, True),
]

CHILD = r"""
import json, resource, sys
import torch, torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
sys.path.insert(0, sys.argv[1])
from llmforge.estimate import model_config
overrides, precision, ckpt, batch, seq, fused = json.loads(sys.argv[2])
cfg = model_config("125m", **overrides)
torch.manual_seed(0)
tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
from llmforge.models.transformer import Transformer
base = rss()
model = Transformer(cfg)
if precision == "bf16-true":
    model = model.bfloat16()
if ckpt:
    for block in model.blocks:
        f = block.forward
        block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(f)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as on GPU: no foreach temporaries
from llmforge.objectives.loss import chunked_loss
def loss_fn():  # as CausalLM.loss: the logits are freed before the backward
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        if fused:  # objective.fused_ce: the chunked head inside the forward
            head = lambda h, linear: chunked_loss(h, linear.weight, tokens[:, 1:])
            return model(tokens[:, :-1], head=head).loss
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.float().view(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
for _ in range(2):  # the second step runs with every optimizer state allocated
    loss_fn().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(json.dumps({"peak": rss() - base}))
"""


def main() -> None:
    from llmforge.estimate import memory_per_gpu, model_config

    print(f"{'case':<50}{'estimate':>10}{'measured':>10}{'ratio':>7}")
    only_fused = "--fused" in sys.argv
    for overrides, precision, ckpt, batch, seq, fused in CASES:
        if only_fused and not fused:
            continue
        cfg = model_config("125m", **overrides)
        est = memory_per_gpu(
            cfg,
            strategy="ddp",
            num_gpus=1,
            precision=precision,
            seq_len=seq,
            batch_size=batch,
            activation_checkpointing=ckpt,
            objective={"name": "clm", "fused_ce": fused},
        )
        args = json.dumps([overrides, precision, ckpt, batch, seq, fused])
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(ROOT), args], capture_output=True, text=True, check=True
        )
        peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
        name = f"125m {overrides} {precision}{' ckpt' if ckpt else ''} {batch}x{seq}"
        name += " fused" if fused else ""
        print(f"{name:<50}{est.total / 1e9:>9.2f}G{peak / 1e9:>9.2f}G{peak / est.total:>7.2f}")


if __name__ == "__main__":
    main()
