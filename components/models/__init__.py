from components.models.adapters import BottleneckAdapter, PLACEMENTS
from components.models.bert import BertEncoder
from components.models.output import EncoderOutput, EncoderSpec
from components.models.recursive import (
    minialbert_128,
    minialbert_312,
    recursive_tiny,
    RecursiveEncoder,
)
from components.models.teacher import FrozenTeacher, hf_teacher

__all__ = [
    "BertEncoder",
    "BottleneckAdapter",
    "EncoderOutput",
    "EncoderSpec",
    "FrozenTeacher",
    "hf_teacher",
    "minialbert_128",
    "minialbert_312",
    "PLACEMENTS",
    "recursive_tiny",
    "RecursiveEncoder",
]
