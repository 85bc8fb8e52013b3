"""The student interface: what the recipes, losses, distributed wrapping, checkpoints and export
rely on, and nothing more. A new student family implements it and adds one entry to
``components.models.families.ENCODERS`` (and, to be written in a transformers format, one to
``components.checkpointing.student.FORMATS``).

Both families shipped implement it: ``RecursiveEncoder``
(MiniALBERT) and ``BottleneckEncoder`` (MobileBERT).
"""

import logging
from typing import Any, Collection, Dict, List, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from components.errors import ConfigError
from components.models.output import EncoderOutput, EncoderSpec


@runtime_checkable
class Student(Protocol):
    """A student encoder (an ``nn.Module``).

    Attributes:
        config: every builder argument, JSON-able: ``type(model)(**model.config)`` rebuilds it.
            Must hold ``vocab_size``, ``pad_token_id`` and ``max_position_embeddings``.
        activation_checkpointing: when ``True`` in training, each layer (iteration) is
            recomputed in the backward pass.
        spec: the shapes losses align on (layers, width of the hidden states it returns,
            heads, vocabulary, whether it has an MLM head).
    """

    config: Dict[str, Any]
    activation_checkpointing: bool

    @property
    def spec(self) -> EncoderSpec: ...

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        *,
        attention_layers: Collection[int] = (),
        logits_mask: Optional[torch.Tensor] = None,
        return_logits: bool = True,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> EncoderOutput:
        """``hidden_states[0]`` the embedding output and ``hidden_states[i]`` layer ``i``'s, all
        ``spec.hidden_size`` wide; attention probabilities only for the 1-based
        ``attention_layers``; MLM logits at ``logits_mask`` positions (all when ``None``),
        none when ``return_logits`` is ``False``. ``segment_ids`` (packed rows, ``data.pack``)
        numbers the sequences of each row from 1 (0 = padding): each sequence must be encoded
        exactly as alone in a padded row (block-diagonal attention, positions restarting)."""
        ...

    def adapter_parameters(self) -> List[nn.Parameter]:
        """What adapter-only fine-tuning trains besides a head (empty without adapters)."""
        ...


def check_student(model: Any, where: str = "student") -> None:
    """A clear error when a builder returned something that is not a ``Student``."""
    missing = [
        name
        for name in ("config", "spec", "activation_checkpointing", "adapter_parameters")
        if not hasattr(model, name)
    ]
    if not isinstance(model, nn.Module) or missing:
        raise ConfigError(
            f"{where}: {type(model).__name__} is not a student (an nn.Module with config, spec, "
            f"activation_checkpointing, adapter_parameters and the forward of components.models.student.Student)"
            + (f"; it lacks {missing}" if missing else "")
        )
    absent = [key for key in ("vocab_size", "pad_token_id", "max_position_embeddings") if key not in model.config]
    if absent:
        raise ConfigError(f"{where}: {type(model).__name__}.config lacks {absent}")


def copy_teacher_embeddings(student: nn.Module, teacher: nn.Module) -> List[str]:
    """Copy every ``embeddings.*`` tensor of ``teacher`` whose name and shape the student shares
    (MobileBERT starts from its teacher's embeddings "where widths allow"); returns the names
    copied. Raises when nothing fits, naming both sides' shapes."""
    theirs = dict(teacher.state_dict())
    copied, skipped = [], []
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            if not name.startswith("embeddings."):
                continue
            source = theirs.get(name)
            if source is not None and hasattr(source, "full_tensor"):  # a sharded teacher
                source = source.full_tensor()
            if source is not None and tuple(source.shape) == tuple(tensor.shape):
                tensor.copy_(source.to(tensor.dtype))
                copied.append(name)
            else:
                skipped.append(
                    f"{name} {tuple(tensor.shape)} (teacher: {tuple(source.shape) if source is not None else 'none'})"
                )
    if not copied:
        raise ConfigError(
            "copy_teacher_embeddings: no embedding of the student has the teacher's name and shape: "
            + "; ".join(skipped)
        )
    logging.getLogger(__name__).info(
        "Copied the teacher's %s into the student%s",
        ", ".join(copied),
        f"; not {', '.join(skipped)}" if skipped else "",
    )
    return copied
