"""``python -m llmforge.lm_eval ...``: lm-eval's own command line, with ``--model llmforge``.

lm-eval 0.4 looks models up in its own registry only, so its ``lm_eval`` command cannot find a model that
another package defines; this module registers `LlmforgeLM` and hands every argument to lm-eval's CLI::

    python -m llmforge.lm_eval --model llmforge --model_args checkpoint=runs/demo \
        --tasks llmforge_stdlib --include_path llmforge/downstream/tasks
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import llmforge.downstream.adapter  # noqa: F401  (registers --model llmforge)

    cli_evaluate()


if __name__ == "__main__":
    main()
