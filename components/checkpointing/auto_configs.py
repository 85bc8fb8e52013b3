"""The transformers config classes of what this library writes (``recursive_encoder``,
``bottleneck_encoder``, ``finetuned_encoder``) and the table of model classes each one gets:
read by ``auto`` (registration) and
``auto_models`` (the classes themselves)."""

from typing import Any, Dict, Optional, Tuple

from transformers import PreTrainedConfig

from components.checkpointing.finetuned import check_label_count, FINETUNED_MODEL_TYPE
from components.checkpointing.student import class_prefix
from components.checkpointing.student import NATIVE_MODEL_TYPE as STUDENT_MODEL_TYPE
from components.models.families import ENCODERS


class EncoderConfig(PreTrainedConfig):
    """What both config types share: the encoder's family and builder arguments, and the
    fields transformers' pipelines and tokenizers read, derived from those arguments."""

    format_version: int = 1

    def encoder_family(self) -> Tuple[str, Dict[str, Any]]:
        raise NotImplementedError

    def builder_key(self) -> str:
        """The config.json key holding the builder arguments, for messages (``recursive_encoder``...)."""
        raise NotImplementedError

    def _derive(self, kwargs: Dict[str, Any]) -> None:
        family, args = self.encoder_family()
        if not args:  # transformers builds configs without arguments to find their defaults
            return
        if family not in ENCODERS:
            raise ValueError(f"{type(self).__name__}: unknown encoder family {family!r}; known: {sorted(ENCODERS)}")
        for theirs, ours in (
            ("vocab_size", "vocab_size"),
            ("hidden_size", "hidden_size"),
            ("num_attention_heads", "num_heads"),
            ("num_hidden_layers", "num_iterations" if "num_iterations" in args else "num_layers"),
            ("max_position_embeddings", "max_position_embeddings"),
            ("pad_token_id", "pad_token_id"),
        ):
            if ours in args:
                kwargs[theirs] = args[ours]
        kwargs["tie_word_embeddings"] = bool(args.get("tie_word_embeddings", False))


class _NativeStudentConfig(EncoderConfig):
    """A student in our native format: the builder arguments under the key named like the
    ``model_type`` (the family)."""

    def __post_init__(self, **kwargs):
        setattr(self, self.model_type, dict(getattr(self, self.model_type) or {}))
        self._derive(kwargs)
        super().__post_init__(**kwargs)

    def encoder_family(self):
        return self.model_type, getattr(self, self.model_type)

    def builder_key(self) -> str:
        return self.model_type


class StudentConfig(_NativeStudentConfig):
    """``config.json`` of a recursive student in our native format (``model_type: recursive_encoder``).

    Args:
        recursive_encoder: the ``RecursiveEncoder`` builder arguments, as saved.
    """

    model_type = STUDENT_MODEL_TYPE
    recursive_encoder: Optional[Dict[str, Any]] = None


class BottleneckStudentConfig(_NativeStudentConfig):
    """``config.json`` of a bottleneck student that transformers' MobileBERT cannot express
    (``model_type: bottleneck_encoder``; every other one is written as a MobileBERT).

    Args:
        bottleneck_encoder: the ``BottleneckEncoder`` builder arguments, as saved.
    """

    model_type = "bottleneck_encoder"
    bottleneck_encoder: Optional[Dict[str, Any]] = None


class FinetunedConfig(EncoderConfig):
    """``config.json`` of a fine-tuned model written by ``recipes/finetune.py``.

    Args:
        encoder: ``{"family": ..., "config": builder arguments}``.
        head: ``{"task_type", "num_labels", "dropout"}``.
        task: the task description (``label_names``...), as the run saved it.
    """

    model_type = FINETUNED_MODEL_TYPE
    encoder: Optional[Dict[str, Any]] = None
    head: Optional[Dict[str, Any]] = None
    task: Optional[Dict[str, Any]] = None

    def __post_init__(self, **kwargs):
        if not self.encoder or not self.head:  # transformers' default instance, for diffs
            super().__post_init__(**kwargs)
            return
        self._derive(kwargs)
        kwargs.pop("num_labels", None)
        names = (self.task or {}).get("label_names")
        if self.head["task_type"] == "regression":
            self.problem_type, self.id2label = "regression", {0: "score"}
        else:
            self.problem_type = "single_label_classification" if self.head["task_type"] == "classification" else None
            where = kwargs.get("name_or_path") or ""  # the folder, when read by from_pretrained
            check_label_count(
                f"{where}/config.json" if where else "FinetunedConfig", self.head.get("num_labels"), names
            )
            names = names or [f"LABEL_{i}" for i in range(self.head["num_labels"])]
            self.id2label = {i: str(name) for i, name in enumerate(names)}
        self.label2id = {name: i for i, name in self.id2label.items()}
        super().__post_init__(**kwargs)

    def encoder_family(self):
        return (self.encoder or {}).get("family"), (self.encoder or {}).get("config")

    def builder_key(self) -> str:
        return "encoder.config"


# ------------------------------------------------------------------ registration
# (config class, class-name prefix, tasks); auto_models builds the real classes
_ALL_TASKS = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")
MODEL_CLASSES = tuple(
    (config_class, class_prefix(config_class.model_type), tasks)
    for config_class, tasks in (
        (StudentConfig, _ALL_TASKS),
        (BottleneckStudentConfig, _ALL_TASKS),
        (FinetunedConfig, ("Model", "ForSequenceClassification", "ForTokenClassification")),
    )
)
