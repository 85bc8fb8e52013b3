"""Task heads on an encoder, for fine-tuning: sentence classification or regression, and token
classification.

    sentence:  logits = classifier(dropout(tanh(pooler(h[CLS]))))     # BERT's and ALBERT's head
    token:     logits = classifier(dropout(h))                         # at every position

The encoder is any module that returns an ``EncoderOutput`` (a recursive student or a BERT
teacher); its MLM head is not used. Parameter names are ``encoder.*`` and ``head.*``, so tuning
modes are globs: ``head.*`` alone, ``encoder.adapters.*`` + ``head.*``, or everything.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from components.models.layers import init_weights

TASK_TYPES = ("classification", "regression", "token_classification")


class SequenceHead(nn.Module):
    """The [CLS] position through a tanh pooler, then a linear layer to the labels."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.tanh(self.pooler(hidden[:, 0]))))


class TokenHead(nn.Module):
    """A linear layer to the labels at every position."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(hidden))


class TaskModel(nn.Module):
    """An encoder with a task head.

    Args:
        encoder: returns an ``EncoderOutput``; must expose ``spec.hidden_size``.
        task_type: ``classification``, ``regression`` (one output, MSE) or
            ``token_classification``.
        num_labels: outputs of the head (1 for regression).
        dropout: dropout before the classifier.
    """

    def __init__(self, encoder: nn.Module, task_type: str, num_labels: int, dropout: float = 0.1):
        super().__init__()
        if task_type not in TASK_TYPES:
            raise ValueError(f"task type must be one of {list(TASK_TYPES)}, got {task_type!r}")
        self.encoder = encoder
        self.task_type = task_type
        self.head_config = {"task_type": task_type, "num_labels": num_labels, "dropout": dropout}
        hidden = encoder.spec.hidden_size
        head = TokenHead if task_type == "token_classification" else SequenceHead
        self.head = head(hidden, num_labels, dropout)
        init_weights(self.head)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits ``[batch, num_labels]`` (``[batch, seq, num_labels]`` for tokens); for
        regression ``[batch]``."""
        hidden = self.encoder(input_ids, attention_mask, token_type_ids, return_logits=False).last_hidden_state
        logits = self.head(hidden)
        return logits.squeeze(-1) if self.task_type == "regression" else logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return task_loss(self.task_type, logits, labels)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Class ids (per token for token classification), or the regression values."""
        return logits.float() if self.task_type == "regression" else logits.argmax(-1)


def task_loss(task_type: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (tokens labelled -100 ignored) or, for regression (``logits`` ``[batch]``),
    mean squared error."""
    if task_type == "regression":
        return F.mse_loss(logits.float(), labels.float())
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)


def tuning_patterns(tuning: str) -> List[str]:
    """What trains in each tuning mode, as globs over ``TaskModel`` parameter names.

    ``adapters``: the per-iteration (per-layer, for a BERT encoder) adapters, with their
    LayerNorms in MiniALBERT's variant, and the head; the embeddings, the projector and the
    shared layer (the layers), LayerNorms included, stay frozen (MiniALBERT's adapter tuning).
    An encoder without adapters gets fresh ones first (``components.models.add_adapters``).
    """
    patterns = {"full": ["*"], "adapters": ["encoder.adapters.*", "head.*"], "head": ["head.*"]}
    if tuning not in patterns:
        raise ValueError(f"tuning must be one of {list(patterns)}, got {tuning!r}")
    return patterns[tuning]
