"""Components of the recursive-distill recipes: models, losses, data, training, checkpointing.

Importing this package registers the model types this library writes with transformers'
Auto classes (see ``components.checkpointing.auto``), so that

    import components, transformers
    transformers.AutoModelForMaskedLM.from_pretrained("<run>/student")

works for every student and fine-tuned model, with no ``trust_remote_code``.
"""

from components.checkpointing.auto import register as _register

_register()
