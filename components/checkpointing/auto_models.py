"""The transformers model classes of :mod:`components.checkpointing.auto` (imported on first
use: transformers' ``modeling_utils`` takes seconds to import)."""

from typing import Dict

import torch
from torch import nn
from transformers import initialization as init, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from components.checkpointing.auto import _EncoderConfig, MODEL_CLASSES
from components.models.adapters import BottleneckAdapter
from components.models.families import ENCODERS
from components.models.tasks import SequenceHead, task_loss, TokenHead


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


_BASES = {
    "Model": _Model,
    "ForMaskedLM": _ForMaskedLM,
    "ForSequenceClassification": _ForSequenceClassification,
    "ForTokenClassification": _ForTokenClassification,
}
# one concrete class per (config type, task): Auto registration wants each model class to name
# its own config class
CLASSES: Dict[str, type] = {
    prefix + task: type(prefix + task, (_BASES[task],), {"config_class": config_class, "__doc__": _BASES[task].__doc__})
    for config_class, prefix, tasks in MODEL_CLASSES
    for task in tasks
}


def model_class(name: str) -> type:
    """The transformers class called ``name`` (``RecursiveEncoderForMaskedLM``...)."""
    return CLASSES[name]
