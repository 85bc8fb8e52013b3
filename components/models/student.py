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


def init_from_teacher(student: nn.Module, teacher: nn.Module, layer: Optional[int] = None, embeddings: bool = False):
    """Start a recursive student from its teacher's weights; returns what was initialised.

    ``layer``: the 1-based teacher layer whose weights become the shared layer's (shapes must
    agree: the same width, heads and FFN). ``embeddings``: the teacher's word, position and
    token-type embeddings factorised to the student's width E by a truncated SVD of the three
    tables stacked (ALBERT's factorisation ``V x H = (V x E)(E x H)``, fitted instead of
    learned): the tables get ``U_E S_E``, the projector ``V_E^T``, the embedding LayerNorm the
    identity, so the projector's output is the teacher's embedding sum up to the SVD's error
    (the teacher's own LayerNorm then differs: a start, not an equivalence)."""
    teacher_layers = getattr(teacher, "layers", None)
    if not hasattr(student, "layer") or teacher_layers is None:
        raise ConfigError(
            f"init_from_teacher needs a recursive student and a layered teacher, got "
            f"{type(student).__name__} and {type(teacher).__name__}"
        )
    done = []
    with torch.no_grad():
        if layer is not None:
            if not 1 <= layer <= len(teacher_layers):
                raise ConfigError(f"init_from_teacher.layer={layer}: the teacher has layers 1..{len(teacher_layers)}")
            source = {k: _full(v) for k, v in teacher_layers[layer - 1].state_dict().items()}
            target = student.layer.state_dict()
            wrong = [
                f"{k} {tuple(v.shape)} vs {tuple(source[k].shape)}"
                for k, v in target.items()
                if k in source and source[k].shape != v.shape
            ]
            if wrong or source.keys() != target.keys():
                raise ConfigError(
                    f"init_from_teacher.layer: the shared layer's shapes differ from teacher layer {layer}'s: "
                    + ("; ".join(wrong) or "different parameters")
                )
            student.layer.load_state_dict(source)
            done.append(f"the shared layer from teacher layer {layer}")
        if embeddings:
            mine, theirs = student.embeddings, teacher.embeddings
            names = ["word_embeddings", "position_embeddings", "token_type_embeddings"]
            tables = [_full(getattr(theirs, n).weight).float() for n in names]
            width = mine.word_embeddings.weight.shape[1]
            rows = [getattr(mine, n).weight.shape[0] for n in names]
            if [t.shape[0] for t in tables] != rows or not isinstance(student.projector, nn.Linear):
                raise ConfigError(
                    "init_from_teacher.embeddings needs the teacher's vocabulary, positions and token types "
                    f"({[t.shape[0] for t in tables]}) and a student projecting E={width} to H"
                )
            u, s, vt = torch.linalg.svd(torch.cat(tables), full_matrices=False)
            factors = (u[:, :width] * s[:width]).split(rows)
            for n, f in zip(names, factors):
                getattr(mine, n).weight.copy_(f)
            mine.norm.weight.fill_(1.0)
            mine.norm.bias.zero_()
            student.projector.weight.copy_(vt[:width].T)
            student.projector.bias.zero_()
            done.append(f"the embeddings from the teacher's, factorised to E={width} by SVD")
    logging.getLogger(__name__).info("Initialised %s", " and ".join(done) or "nothing")
    return done


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
