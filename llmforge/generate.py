"""python -m llmforge.generate CKPT --prompt "..." [--prompt ...]: read what a trained model writes.

Dispatched on the checkpoint's objective (or ``--mode``): ``clm`` continues each prompt (greedy with
``--greedy`` / ``--temperature 0``, else sampled with temperature, top-k, top-p and ``--seed``; a KV cache
unless ``--no-cache``; a prompt is preceded by EOS, as a document in the packed training stream, unless
``--no-eos-prefix``), ``mlm`` fills every ``<mask>`` (the ``--top-k`` candidates), ``denoise`` fills the
sentinels ``<extra_id_i>``. The decoding itself is `llmforge.inference`.

CKPT is a Lightning checkpoint (or a run dir: its ``checkpoints/last.ckpt``), a consolidated FSDP checkpoint
or a Hugging Face Llama directory (`llmforge.checkpoints.load_model`); the tokenizer is the training data's
(``data.path``/tokenizer.json as recorded; ``--tokenizer`` overrides) or the HF directory's. A checkpoint
that holds anything but tensors and plain data is refused with one line (it could run code).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from llmforge.checkpoints import OBJECTIVES, load_model
from llmforge.inference import DTYPES, Sampling, fill_mask, fill_spans, generate_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m llmforge.generate", description=__doc__.split("\n\n")[0].split(": ", 1)[-1]
    )
    p.add_argument("checkpoint", help="a .ckpt file, a run directory, or a Hugging Face Llama directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--mode", choices=("auto", *OBJECTIVES), default="auto", help="default: the checkpoint's")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument(
        "--top-k", type=int, default=50, help="clm/denoise: keep the k most likely (0: all); mlm: candidates"
    )
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (1.0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every token")
    p.add_argument("--no-eos-prefix", action="store_true", help="do not start causal prompts with EOS")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--tokenizer", help="tokenizer.json (or its directory); default: the training data's")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [line for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
    if not prompts:
        print("error: give at least one --prompt (or --prompt-file)", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        lm = load_model(
            args.checkpoint, device=device, dtype=DTYPES[args.dtype], tokenizer=args.tokenizer, mode=args.mode
        )
        sampling = Sampling(0.0 if args.greedy else args.temperature, args.top_k, args.top_p)
        if lm.objective == "clm":
            results = generate_text(
                lm,
                prompts,
                args.max_new_tokens,
                sampling=sampling,
                seed=args.seed,
                use_cache=not args.no_cache,
                eos_prefix=not args.no_eos_prefix,
            )
        elif lm.objective == "mlm":
            results = [fill_mask(lm, p, top_k=max(args.top_k, 1)) for p in prompts]
        else:
            results = [
                fill_spans(lm, p, args.max_new_tokens, sampling=sampling, seed=args.seed) for p in prompts
            ]
    except (ValueError, FileNotFoundError, KeyError) as err:  # CheckpointRefused too: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r, ensure_ascii=False) if args.json else format_result(lm.objective, r))
    return 0


def format_result(objective: str, r: dict) -> str:
    if objective == "clm":
        return f"{r['prompt']}{r['completion']}\n" + "-" * 40
    lines = [r["prompt"]]
    if objective == "mlm":
        for k, cands in enumerate(r["masks"]):
            lines.append(f"  <mask> #{k}: " + ", ".join(f"{c['token']!r} {c['prob']:.3f}" for c in cands))
    else:
        lines += [f"  {s}: {text!r}" for s, text in r["spans"].items()]
    lines.append(f"  -> {r['filled']}\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
