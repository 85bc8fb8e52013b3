"""The transformers model classes of ``components.checkpointing.auto`` (imported on first
use: transformers' ``modeling_utils`` takes seconds to import).

Folders may come from strangers, so these classes make the check every loader of this library
makes (``check_config_sizes``), in two places:

* ``_build_encoder``, on every path (``from_pretrained`` of a folder or a Hub id, ``from_config``):
  the builder arguments from the config alone, before anything is built, even on the meta device
  (10^7 iterations are 10^7 adapter modules: minutes of Python even without memory);
* ``_load_pretrained_model``, where transformers has resolved the weight files (a local folder or
  a Hub id's snapshot) and laid the model out on the meta device: the same check against the
  weights' header, then shape by shape, before a tensor is read or allocated.

Either refusal is a ``CheckpointError`` naming ``config.json`` and the key.
"""

from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from safetensors import safe_open
from torch import nn
from transformers import initialization as init
from transformers import PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from components.checkpointing.auto_configs import EncoderConfig, MODEL_CLASSES
from components.checkpointing.finetuned import check_head_size
from components.checkpointing.sizes import check_config_sizes, check_shapes
from components.errors import CheckpointError
from components.models.adapters import BottleneckAdapter
from components.models.families import ENCODERS
from components.models.heads import SequenceHead, task_loss, TokenHead


def _config_file(config: EncoderConfig) -> str:
    """What to call ``config`` in messages: the config.json it was read from, where known."""
    source = getattr(config, "name_or_path", "") or ""
    return str(Path(source) / "config.json") if source else f"the {type(config).__name__} passed"


def _header_shapes(files: Iterable[Path]) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Name -> shape of every tensor in safetensors ``files``, from their headers (nothing read);
    ``None`` where a file is not safetensors."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for file in files:
        if file.suffix != ".safetensors":
            return None
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        except Exception as e:
            raise CheckpointError(f"Could not read the header of {file}: {e}") from e
    return shapes


# ------------------------------------------------------------------ models
class _EncoderPreTrainedModel(PreTrainedModel):
    base_model_prefix = "encoder"
    main_input_name = "input_ids"
    # the encoder's MLM head and a task head are dropped where the class has none
    _keys_to_ignore_on_load_unexpected = [r"mlm_head\.", r"^head\."]
    _with_mlm_head = False

    def _build_encoder(self, config: EncoderConfig) -> nn.Module:
        family, args = config.encoder_family()
        if family not in ENCODERS or not isinstance(args, dict):
            raise CheckpointError(
                f"{_config_file(config)}: {config.builder_key()} must hold the builder arguments of one of {sorted(ENCODERS)}"
            )
        # the one check of every loader, from the config alone (the weights are checked in
        # _load_pretrained_model): nothing absurd is built, not even on the meta device
        check_config_sizes(_config_file(config), args, None, None, family=config.builder_key())
        return ENCODERS[family](**{**args, "mlm_head": self._with_mlm_head})

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, *args, **kwargs):
        # transformers' from_pretrained calls this with the resolved weight files and the model
        # laid out on the meta device: the weights' header is compared before a tensor is read
        if isinstance(model, _EncoderPreTrainedModel):
            model._check_weights(state_dict, checkpoint_files)
        return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, *args, **kwargs)

    def _check_weights(self, state_dict: Optional[Mapping[str, torch.Tensor]], files: Optional[Iterable[str]]) -> None:
        """The config's sizes against the weights about to be loaded (``files``' headers, or a
        ``state_dict`` passed in), as ``load_student``
        checks them: the model is on the meta device, nothing is read or allocated yet."""
        if files:
            files = [Path(f) for f in files]
            shapes, weights = _header_shapes(files), files[0] if len(files) == 1 else files[0].parent
            config_file = files[0].parent / "config.json"
        elif state_dict is not None:
            shapes, weights = {k: tuple(v.shape) for k, v in state_dict.items()}, "the state_dict passed"
            config_file = _config_file(self.config)
        else:
            return
        if shapes is None:  # not safetensors: transformers reads those, and compares shapes itself
            return
        family, args = self.config.encoder_family()
        key = self.config.builder_key()
        check_config_sizes(config_file, args, shapes, weights, family=key)
        head = getattr(self.config, "head", None)
        if isinstance(head, dict) and hasattr(self, "head"):  # a fine-tuned model's own head
            check_head_size(config_file, head.get("num_labels"), shapes, weights)
        layout = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        expected = {}  # by the names in the weights: a student folder's lack the encoder. prefix
        for name in shapes:
            ours = name if name in layout else f"{self.base_model_prefix}.{name}"
            if ours in layout:
                expected[name] = layout[ours]
        where = str(config_file.parent) if isinstance(config_file, Path) else config_file
        check_shapes(expected, shapes, where, config_file, weights, args, family=key)

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
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
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
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
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
        if head is not None and (head["task_type"] == "token_classification") != (
            self.task_type == "token_classification"
        ):
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
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
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
