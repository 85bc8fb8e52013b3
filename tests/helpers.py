"""Helpers for tests that build their own tiny checkpoints."""

from pathlib import Path

import torch


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
