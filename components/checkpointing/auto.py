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

The transformers classes wrap the very modules the recipes train (``RecursiveEncoder``,
``BertEncoder``, the task heads), under the attribute ``encoder``, so their outputs are ours
and their state dicts are the saved files' (a student folder's keys gain the ``encoder.``
prefix on load; a fine-tuned model's already have it).
"""

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    initialization as init,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from components.checkpointing.student import NATIVE_MODEL_TYPE as STUDENT_MODEL_TYPE
from components.checkpointing.tasks import FINETUNED_MODEL_TYPE
from components.models.adapters import BottleneckAdapter
from components.models.families import ENCODERS
from components.models.tasks import SequenceHead, task_loss, TokenHead


class _EncoderConfig(PreTrainedConfig):
    """What both config types share: the encoder's family and builder arguments, and the
    fields transformers' pipelines and tokenizers read, derived from those arguments."""

    format_version: int = 1

    def encoder_family(self) -> Tuple[str, Dict[str, Any]]:
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
            ("num_hidden_layers", "num_iterations" if family == "recursive_encoder" else "num_layers"),
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
            names = names or [f"LABEL_{i}" for i in range(self.head["num_labels"])]
            self.id2label = {i: str(name) for i, name in enumerate(names)}
        self.label2id = {name: i for i, name in self.id2label.items()}
        super().__post_init__(**kwargs)

    def encoder_family(self):
        return (self.encoder or {}).get("family"), (self.encoder or {}).get("config")


# ------------------------------------------------------------------ models
class _EncoderPreTrainedModel(PreTrainedModel):
    base_model_prefix = "encoder"
    main_input_name = "input_ids"
    # the encoder's MLM head and a task head are dropped where the class has none
    _keys_to_ignore_on_load_unexpected = [r"mlm_head\.", r"^head\."]
    _with_mlm_head = False

    def _build_encoder(self, config: _EncoderConfig) -> nn.Module:
        family, args = config.encoder_family()
        return ENCODERS[family](**{**args, "mlm_head": self._with_mlm_head})

    @torch.no_grad()
    def initialize_weights(self):
        super().initialize_weights()  # BERT's: N(0, 0.02), zero biases, unit norms
        for module in self.modules():  # adapters start as (re-normalised) identities, as ours do
            if isinstance(module, BottleneckAdapter):
                init.zeros_(module.up.weight)  # a no-op on weights loaded from a checkpoint

    def get_input_embeddings(self):
        return self.encoder.embeddings.word_embeddings

    def _encode(self, input_ids, attention_mask, token_type_ids, output_attentions, want_logits):
        if input_ids is None:
            raise ValueError(f"{type(self).__name__} needs input_ids (inputs_embeds is not supported)")
        layers = range(1, self.encoder.spec.num_layers + 1) if output_attentions else ()
        return self.encoder(
            input_ids, attention_mask, token_type_ids, attention_layers=layers, return_logits=want_logits
        )

    def _extras(self, out, output_hidden_states, output_attentions):
        """(hidden_states, attentions) as transformers returns them: tuples or ``None``."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden = out.hidden_states if output_hidden_states else None
        attentions = tuple(out.attentions[i] for i in sorted(out.attentions)) if output_attentions else None
        return hidden, attentions


class _Model(_EncoderPreTrainedModel):
    """The encoder alone: ``last_hidden_state`` (``AutoModel``, ``feature-extraction``)."""

    def __init__(self, config):
        super().__init__(config)
        self.encoder = self._build_encoder(config)
        self.post_init()

    def forward(
        self, input_ids=None, attention_mask=None, token_type_ids=None, output_attentions=None,
        output_hidden_states=None, return_dict=None, **kwargs,
    ):
        out = self._encode(input_ids, attention_mask, token_type_ids, output_attentions, False)
        hidden, attentions = self._extras(out, output_hidden_states, output_attentions)
        result = BaseModelOutput(last_hidden_state=out.last_hidden_state, hidden_states=hidden, attentions=attentions)
        return result if return_dict is not False else result.to_tuple()


class _ForMaskedLM(_EncoderPreTrainedModel):
    """The encoder with its MLM head (``AutoModelForMaskedLM``, ``fill-mask``)."""

    _with_mlm_head = True
    _keys_to_ignore_on_load_unexpected = [r"^head\."]
    _tied_weights_keys = {"encoder.mlm_head.decoder.weight": "encoder.embeddings.word_embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.encoder = self._build_encoder(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.encoder.mlm_head.decoder

    def forward(
        self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, output_attentions=None,
        output_hidden_states=None, return_dict=None, **kwargs,
    ):
        out = self._encode(input_ids, attention_mask, token_type_ids, output_attentions, True)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        hidden, attentions = self._extras(out, output_hidden_states, output_attentions)
        result = MaskedLMOutput(loss=loss, logits=out.logits, hidden_states=hidden, attentions=attentions)
        return result if return_dict is not False else result.to_tuple()


class _WithTaskHead(_EncoderPreTrainedModel):
    """The encoder with a fine-tuning head; names match ``TaskModel`` (``encoder.*``, ``head.*``)."""

    task_type: str  # set by the subclass
    _keys_to_ignore_on_load_unexpected = [r"mlm_head\."]

    def __init__(self, config):
        super().__init__(config)
        head = getattr(config, "head", None)
        if head is not None and (head["task_type"] == "token_classification") != (self.task_type == "token_classification"):
            raise ValueError(
                f"This model was fine-tuned for {head['task_type']}: load it with "
                f"{'AutoModelForTokenClassification' if head['task_type'] == 'token_classification' else 'AutoModelForSequenceClassification'}"
            )
        if head is not None:
            self.task_type, num_labels, dropout = head["task_type"], head["num_labels"], head["dropout"]
        else:  # a fresh head on a student, as for any transformers encoder
            num_labels = config.num_labels
            if self.task_type != "token_classification" and (config.problem_type == "regression" or num_labels == 1):
                self.task_type = "regression"
            dropout = getattr(config, "classifier_dropout", None)
            dropout = config.encoder_family()[1]["dropout"] if dropout is None else dropout
        self.encoder = self._build_encoder(config)
        head_class = TokenHead if self.task_type == "token_classification" else SequenceHead
        self.head = head_class(self.encoder.spec.hidden_size, num_labels, dropout)
        self.post_init()

    def forward(
        self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, output_attentions=None,
        output_hidden_states=None, return_dict=None, **kwargs,
    ):
        out = self._encode(input_ids, attention_mask, token_type_ids, output_attentions, False)
        logits = self.head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = task_loss(self.task_type, logits.squeeze(-1) if self.task_type == "regression" else logits, labels)
        hidden, attentions = self._extras(out, output_hidden_states, output_attentions)
        output_class = TokenClassifierOutput if self.task_type == "token_classification" else SequenceClassifierOutput
        result = output_class(loss=loss, logits=logits, hidden_states=hidden, attentions=attentions)
        return result if return_dict is not False else result.to_tuple()


class _ForSequenceClassification(_WithTaskHead):
    """A sentence (or pair) classification or regression head on [CLS]."""

    task_type = "classification"


class _ForTokenClassification(_WithTaskHead):
    """A per-token classification head (NER)."""

    task_type = "token_classification"


def _classes(config_class, prefix: str, bases) -> Dict[Any, type]:
    """One concrete transformers class per (config type, task): Auto registration wants each
    model class to name its own config class."""
    return {
        auto: type(f"{prefix}{base.__name__.lstrip('_')}", (base,), {"config_class": config_class, "__doc__": base.__doc__})
        for auto, base in bases.items()
    }


_STUDENT_TASKS = {
    AutoModel: _Model,
    AutoModelForMaskedLM: _ForMaskedLM,
    AutoModelForSequenceClassification: _ForSequenceClassification,
    AutoModelForTokenClassification: _ForTokenClassification,
}
STUDENT_CLASSES = _classes(StudentConfig, "RecursiveEncoder", _STUDENT_TASKS)
BOTTLENECK_CLASSES = _classes(BottleneckStudentConfig, "BottleneckEncoder", _STUDENT_TASKS)
FINETUNED_CLASSES = _classes(
    FinetunedConfig,
    "FinetunedEncoder",
    {
        AutoModel: _Model,
        AutoModelForSequenceClassification: _ForSequenceClassification,
        AutoModelForTokenClassification: _ForTokenClassification,
    },
)


def register() -> None:
    """Register our model types with transformers' Auto classes (idempotent)."""
    for config_class, classes in (
        (StudentConfig, STUDENT_CLASSES),
        (BottleneckStudentConfig, BOTTLENECK_CLASSES),
        (FinetunedConfig, FINETUNED_CLASSES),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto, model_class in classes.items():
            auto.register(config_class, model_class, exist_ok=True)
