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

import transformers

from components.checkpointing.auto_configs import MODEL_CLASSES

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
    for config_class, prefix, tasks in MODEL_CLASSES:
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for task in tasks:
            auto = getattr(transformers, _AUTO[task])
            auto.register(config_class, _stand_in(prefix + task, config_class), exist_ok=True)
