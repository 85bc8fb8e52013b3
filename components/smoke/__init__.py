"""SMOKE RUN: the embedded default, built on the fly with no download. A tiny teacher and a corpus
of this Python's standard-library docstrings (``assets``), and small
synthetic downstream tasks (``tasks``). They prove that every part of the
pipeline runs; they say nothing about the quality of a real distillation."""

from components.smoke.assets import (
    ensure_smoke_assets,
    smoke_corpus,
    smoke_teacher,
    stdlib_docstrings,
    train_tokenizer,
)
from components.smoke.tasks import smoke_task, SMOKE_TASK_CONFIGS

__all__ = [
    "ensure_smoke_assets",
    "smoke_corpus",
    "smoke_task",
    "SMOKE_TASK_CONFIGS",
    "smoke_teacher",
    "stdlib_docstrings",
    "train_tokenizer",
]
