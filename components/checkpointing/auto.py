"""Everything this library writes, loadable through transformers' Auto classes and pipelines.

``import components`` registers three model types with transformers (no ``trust_remote_code``):

* ``recursive_encoder`` (and ``bottleneck_encoder``): a student in our native format
  (adapters, or a MiniALBERT-wide MLM head; a bottleneck student MobileBERT cannot express). ``AutoConfig``, ``AutoModel`` (hidden states), ``AutoModelForMaskedLM`` and, with a
  fresh head for fine-tuning in transformers, ``AutoModelForSequenceClassification`` /
  ``AutoModelForTokenClassification``.
* ``finetuned_encoder``: a model written by ``recipes/finetune.py`` (``tuning=full``):
  ``AutoModel`` and the sequence or token classification class matching its head, with the
  run's label names in ``config.id2label``.

So ``pipeline("fill-mask", model="<run>/student")`` and
``pipeline("text-classification", model="<finetune run>/model")`` work. Adapter-free students
are written as plain ALBERT checkpoints and need none of this.

The transformers classes (``components.checkpointing.auto_models``) wrap the very modules the
recipes train (``RecursiveEncoder``, ``BottleneckEncoder``, ``BertEncoder``, the task heads),
under the attribute ``encoder``, so their outputs are ours and their state dicts are the saved
files' (a student folder's keys gain the ``encoder.`` prefix on load; a fine-tuned model's
already have it).

Folders may come from strangers: building a model checks the config's sizes first, and loading
weights checks them against the weights' header, with the check every loader of this library
makes (``check_config_sizes``; see ``auto_models``), so an absurd config.json is a one-line
``CheckpointError`` naming the file and the key, not a hang or an out-of-memory kill.

Registration is light: the config classes are registered as they are, the model classes as
stand-ins that import ``auto_models`` (and transformers' ``modeling_utils``, seconds of import
time) on the first ``from_pretrained`` / ``from_config``. ``tune run`` never pays for it.
"""

from typing import Any, Dict, Optional, Tuple

from transformers import PreTrainedConfig

from components.checkpointing.student import class_prefix, NATIVE_MODEL_TYPE as STUDENT_MODEL_TYPE
from components.checkpointing.tasks import check_label_count, FINETUNED_MODEL_TYPE
from components.models.families import ENCODERS


class _EncoderConfig(PreTrainedConfig):
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


class _NativeStudentConfig(_EncoderConfig):
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


class FinetunedConfig(_EncoderConfig):
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
            check_label_count(f"{where}/config.json" if where else "FinetunedConfig", self.head.get("num_labels"), names)
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
_AUTO = {
    "Model": "AutoModel",
    "ForMaskedLM": "AutoModelForMaskedLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
}


def _stand_in(name: str, config_class: type) -> type:
    """A class named like the real one that transformers can register without importing it;
    loading through it builds the real class (``auto_models``) and loads with that."""

    def real():
        from components.checkpointing.auto_models import model_class

        return model_class(name)

    return type(
        name,
        (),
        {
            "config_class": config_class,
            "__doc__": f"Stand-in for components.checkpointing.auto_models.{name}, imported on first use.",
            "from_pretrained": classmethod(lambda cls, *args, **kwargs: real().from_pretrained(*args, **kwargs)),
            "from_config": classmethod(lambda cls, *args, **kwargs: real().from_config(*args, **kwargs)),
            "_from_config": classmethod(lambda cls, *args, **kwargs: real()._from_config(*args, **kwargs)),
        },
    )


def register() -> None:
    """Register our model types with transformers' Auto classes (idempotent)."""
    import transformers

    for config_class, prefix, tasks in MODEL_CLASSES:
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for task in tasks:
            auto = getattr(transformers, _AUTO[task])
            auto.register(config_class, _stand_in(prefix + task, config_class), exist_ok=True)
