"""Encoder families by the name saved with them: a new student family is one entry here."""

from torch import nn

from components.errors import CheckpointError
from components.models.bert import BertEncoder
from components.models.bottleneck import BottleneckEncoder
from components.models.recursive import RecursiveEncoder

# family name (as saved in config files) -> class built from the saved builder arguments
ENCODERS = {"recursive_encoder": RecursiveEncoder, "bottleneck_encoder": BottleneckEncoder, "bert_encoder": BertEncoder}


def encoder_family(encoder: nn.Module) -> str:
    """The saved family name of ``encoder``."""
    for name, cls in ENCODERS.items():
        if type(encoder) is cls:
            return name
    raise CheckpointError(f"No saved format for encoders of type {type(encoder).__name__}; known: {sorted(ENCODERS)}")
