"""Helpers for tests: where the repository and ``tune`` are, launching a recipe the README's way,
and building tiny checkpoints."""

import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
"""The repository root: the working directory of every ``tune run`` (configs/ and recipes/ are relative to it)."""
TUNE = Path(sys.executable).with_name("tune")
"""The ``tune`` of this environment (next to its python), not whichever one is first on PATH."""


def tune_command(recipe: str, *args, nproc: Optional[int] = None) -> List[str]:
    """``tune run [--nproc_per_node N] recipes/<recipe>.py args...``, the README's command."""
    launcher = ["--nproc_per_node", str(nproc)] if nproc else []
    return [str(TUNE), "run", *launcher, f"recipes/{recipe}.py", *map(str, args)]


def torchrun_command(recipe: str, *args, nproc: int) -> List[str]:
    """What ``tune run --nproc_per_node N recipes/<recipe>.py args...`` launches (torchrun,
    standalone, the recipe as a module), without tune's own start-up: for the distributed launches
    that are not there to prove the command line."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*launcher, "-m", f"recipes.{recipe}", *map(str, args)]


def tune_run(recipe: str, *args, nproc: Optional[int] = None, timeout: float = 600, **kwargs):
    """Run :func:`tune_command` from the repository root and wait: a ``subprocess.CompletedProcess``
    with text output (stdout and stderr captured separately unless ``kwargs`` say otherwise)."""
    if "stdout" not in kwargs and "stderr" not in kwargs:
        kwargs["capture_output"] = True
    return subprocess.run(tune_command(recipe, *args, nproc=nproc), cwd=REPO, text=True, timeout=timeout, **kwargs)


def make_hf_teacher(folder: Path, tokenizer, kind: str = "bert", layers: int = 4, hidden: int = 32, seed: int = 0):
    """Save a random tiny HF model of ``kind`` ("bert", "roberta", "bert-no-head") with the tokenizer."""
    from transformers import BertConfig, BertForMaskedLM, BertModel, RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=80,
        pad_token_id=tokenizer.pad_token_id,
    )
    if kind == "bert":
        model = BertForMaskedLM(BertConfig(**common))
    elif kind == "bert-no-head":
        model = BertModel(BertConfig(**common), add_pooling_layer=False)
    elif kind == "roberta":
        model = RobertaForMaskedLM(RobertaConfig(**common))
    else:
        raise ValueError(kind)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


class FailingLogger:
    """A metric logger (``metric_logger._component_``) whose ``fail_at``-th write raises
    ``error`` ("OSError" or "KeyboardInterrupt"): a full disk or a Ctrl-C on the main rank."""

    def __init__(self, fail_at: int = 2, error: str = "OSError"):
        self.fail_at, self.error, self.writes = fail_at, error, 0

    def log_dict(self, payload, step):
        self.writes += 1
        if self.writes == self.fail_at:
            if self.error == "KeyboardInterrupt":
                raise KeyboardInterrupt
            raise OSError(28, f"No space left on device (metrics of step {step})")

    def close(self):
        pass


def load_task(data, task, tokenizer):
    """``load_task_data`` on config sections with the schema's defaults filled in, as the
    fine-tuning recipe's config check fills them."""
    from components.config import check_section
    from components.data.task_data import load_task_data
    from components.training.schema import TaskConfig, TaskDataConfig

    return load_task_data(
        check_section(data, TaskDataConfig, "data"), check_section(task, TaskConfig, "task"), tokenizer
    )
