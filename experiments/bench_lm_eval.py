"""lm-eval adapter throughput: llmforge's `LlmforgeLM` vs lm-eval's own `hf` model on the exported checkpoint.

Same process, same requests (the shipped ``llmforge_stdlib`` task's loglikelihood requests and rolling
loglikelihoods of its question texts), same batch size, fp32 on the CPU, rounds alternated; the
loglikelihoods of both are checked equal (<= 1e-4) before timing.

    .venv/bin/python experiments/bench_lm_eval.py [--ckpt runs/demo/checkpoints/last.ckpt] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from llmforge.downstream.adapter import LlmforgeLM  # noqa: E402
from llmforge.downstream.stdlib_task import ITEMS  # noqa: E402
from llmforge.export import main as export_main  # noqa: E402


def requests(n_items: int) -> tuple[list[Instance], list[Instance]]:
    import json

    items = [json.loads(line) for line in ITEMS.read_text().splitlines()[:n_items]]
    ll = [
        Instance("loglikelihood", {}, (item["question"], " " + choice), i)
        for i, item in enumerate(items)
        for choice in item["choices"]
    ]
    rolling = [
        Instance("loglikelihood_rolling", {}, (item["question"] * 8,), i) for i, item in enumerate(items)
    ]
    return ll, rolling


def timed(fn, reqs) -> tuple[float, list]:
    start = time.perf_counter()
    out = fn(reqs)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="runs/demo/checkpoints/last.ckpt")
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        assert export_main([args.ckpt, str(hf_dir)]) == 0
        ours = LlmforgeLM(checkpoint=args.ckpt, batch_size=args.batch_size)
        theirs = HFLM(
            pretrained=str(hf_dir),
            dtype="float32",
            device="cpu",
            batch_size=args.batch_size,
            prefix_token_id=ours.eot_token_id,
        )
        ll, rolling = requests(args.items)
        a, b = ours.loglikelihood(ll), theirs.loglikelihood(ll, disable_tqdm=True)
        worst = max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True))
        ra, rb = ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling, disable_tqdm=True)
        worst = max(worst, max(abs(x - y) for x, y in zip(ra, rb, strict=True)))
        print(f"{len(ll)} loglikelihood + {len(rolling)} rolling requests; max |difference| {worst:.2e}")
        assert worst <= 1e-4
        for kind, reqs, fa, fb in (
            ("loglikelihood", ll, ours.loglikelihood, lambda r: theirs.loglikelihood(r, disable_tqdm=True)),
            (
                "loglikelihood_rolling",
                rolling,
                ours.loglikelihood_rolling,
                lambda r: theirs.loglikelihood_rolling(r, disable_tqdm=True),
            ),
        ):
            ta, tb = [], []
            for _ in range(args.rounds):
                ta.append(timed(fa, reqs)[0])
                tb.append(timed(fb, reqs)[0])
            qa, qb = len(reqs) / statistics.median(ta), len(reqs) / statistics.median(tb)
            paired = statistics.median(b_ / a_ for a_, b_ in zip(ta, tb, strict=True))
            print(
                f"{kind}: llmforge {qa:.0f} requests/s, lm-eval hf {qb:.0f} requests/s, "
                f"ratio {qa / qb:.2f} (paired {paired:.2f}; batch {args.batch_size}, {args.threads} threads)"
            )


if __name__ == "__main__":
    main()
