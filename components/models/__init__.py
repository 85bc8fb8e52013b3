from components.models.adapters import add_adapters, BottleneckAdapter, PLACEMENTS
from components.models.bert import BertEncoder
from components.models.bottleneck import bottleneck_tiny, BottleneckEncoder, mobilebert, mobilebert_tiny
from components.models.output import EncoderOutput, EncoderSpec
from components.models.recursive import (
    minialbert_128,
    minialbert_312,
    recursive_tiny,
    RecursiveEncoder,
)
from components.models.teacher import FrozenTeacher

__all__ = [
    "add_adapters",
    "BertEncoder",
    "bottleneck_tiny",
    "BottleneckEncoder",
    "BottleneckAdapter",
    "EncoderOutput",
    "EncoderSpec",
    "FrozenTeacher",
    "minialbert_128",
    "minialbert_312",
    "mobilebert",
    "mobilebert_tiny",
    "PLACEMENTS",
    "recursive_tiny",
    "RecursiveEncoder",
]
