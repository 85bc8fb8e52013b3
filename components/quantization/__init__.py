"""Quantisation: the schemes' numerics, quantisation-aware training, and the int8 export."""

from components.quantization.qat import convert_qat, is_prepared, prepare_qat, set_fake_quantize
from components.quantization.schemes import get_scheme, Scheme, SCHEME_NAMES, SCHEMES

__all__ = [
    "convert_qat",
    "get_scheme",
    "is_prepared",
    "prepare_qat",
    "Scheme",
    "SCHEME_NAMES",
    "SCHEMES",
    "set_fake_quantize",
]
