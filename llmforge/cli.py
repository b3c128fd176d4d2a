"""``llmforge <command> [args ...]``: one command for every ``python -m llmforge.<x>`` entry point.

``llmforge train model=tiny trainer.max_steps=50`` is ``python -m llmforge.train model=tiny
trainer.max_steps=50``: the command's module is run as ``__main__`` with the same arguments (``runpy``,
as ``python -m`` does), so Hydra finds ``conf/`` and names the job as it would, Lightning starts the
other ranks of a multi-process run with ``python -m llmforge.train ...``, and exit codes are the
module's. The current directory goes first on ``sys.path``, as under ``python -m``.
"""

from __future__ import annotations

import os
import runpy
import sys

# command -> (module run as __main__, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("llmforge.prepare", "data stage: crawl or text files -> cleaned, deduplicated token shards"),
    "train": ("llmforge.train", "pre-train a model on token shards (Hydra: group=option key=value ...)"),
    "plot": ("llmforge.plot", "training curves of a run as a PNG"),
    "estimate": ("llmforge.estimate", "FLOPs, GPU-hours, memory per GPU and money of a run"),
    "generate": ("llmforge.generate", "continue, fill masks or spans with a trained model"),
    "evaluate": ("llmforge.evaluate", "loss, perplexity and bits per byte on a split"),
    "export": ("llmforge.export", "a checkpoint as a Hugging Face directory"),
    "consolidate": ("llmforge.consolidate", "a sharded (FSDP) checkpoint as one file"),
    "tokenizer": ("llmforge.tokenizer", "one tokenizer trained on several prepared datasets (a mixture)"),
    "inspect": ("llmforge.inspect", "the documents every window of a training step came from"),
    "lm-eval": ("llmforge.lm_eval", "lm-evaluation-harness's command line with --model llmforge"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(
        ["usage: llmforge <command> [args ...]   (llmforge <command> --help: its arguments)", "", "commands:"]
        + lines
    )


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = COMMANDS[name][0]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    saved = sys.argv
    sys.argv = [f"llmforge {name}", *rest]  # runpy replaces argv[0] with the module's file
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
