"""lm-eval loads ``!function`` hooks from a file beside the task YAML: the shipped items' loader."""

from llmforge.downstream.stdlib_task import load_dataset  # noqa: F401
