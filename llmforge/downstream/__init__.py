"""Downstream evaluation: llmforge models in EleutherAI's lm-evaluation-harness, and decontamination.

- `llmforge.downstream.adapter`: `LlmforgeLM`, an ``lm_eval.api.model.TemplateLM`` registered in lm-eval as
  ``llmforge`` (loglikelihood, loglikelihood_rolling, generate_until on llmforge's own model and KV cache);
- `llmforge.downstream.harness`: run a task list (lm-eval's own tasks and the ones shipped in
  ``llmforge/downstream/tasks/``) on a checkpoint or on a model in memory, and flatten the scores;
- `llmforge.downstream.stdlib_task`: writes the shipped offline task built from Python's standard library.

The in-loop evaluation callback is `llmforge.callbacks.DownstreamEval`; the data stage's decontamination
filter is `llmforge.prep.decontaminate`.

lm-eval is an optional dependency (``pip install -e '.[eval]'``): nothing in the base install imports this
package; the decontamination filter of the data stage (`llmforge.prep.decontaminate`) only imports lm-eval
when it builds its n-gram index.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "tasks"
