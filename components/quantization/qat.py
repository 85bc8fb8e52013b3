"""Quantisation-aware training with torchao's fake-quantised modules and our runtime numerics.

    prepare_qat(student, scheme)        # once, before compile and FSDP: Linear -> FakeQuantizedLinear
    set_fake_quantize(student, True)    # a stage with fake_quantize: true turns it on ...
    set_fake_quantize(student, False)   # ... and any other stage off
    convert_qat(student)                # back to plain nn.Linear / nn.Embedding (same weights)

``torchao.quantization.quantize_`` with a ``QATConfig`` swaps every ``nn.Linear`` of the student
for a ``FakeQuantizedLinear`` and the word embeddings for a ``FakeQuantizedEmbedding``. Those are
subclasses of the originals with the same parameters, so state dicts, checkpoints, resume and the
exported student are unchanged by preparation. Their fake quantisers are then replaced by ours
(``components.quantization.schemes``), which round exactly as ONNX Runtime does.
"""

import logging
from typing import Optional

import torch
from torch import nn

from components.quantization.schemes import (
    EMBEDDING_BITS,
    fake_quantize_activation,
    fake_quantize_weight,
    group_for,
    Scheme,
)

log = logging.getLogger(__name__)


class _FakeQuantizer(nn.Module):
    """The interface torchao's fake-quantised modules call: ``enabled`` and ``config``."""

    def __init__(self, config: Scheme):
        super().__init__()
        self.config = config
        self.enabled = False

    def extra_repr(self) -> str:
        return f"scheme={self.config.name}, enabled={self.enabled}"


class WeightFakeQuantizer(_FakeQuantizer):
    """Symmetric integer weights, per output channel (or per group of inputs)."""

    def __init__(self, config: Scheme, bits: int, group_size: Optional[int], qmax: Optional[int] = None):
        super().__init__(config)
        self.bits, self.group_size, self.qmax = bits, group_size, qmax

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_weight(weight, self.bits, self.group_size, self.qmax) if self.enabled else weight


class ActivationFakeQuantizer(_FakeQuantizer):
    """uint8 activations with one dynamic scale per tensor (ONNX Runtime's DynamicQuantizeLinear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activation(x) if self.enabled else x


def _quantizers(model: nn.Module):
    for module in model.modules():
        for name in ("weight_fake_quantizer", "activation_fake_quantizer"):
            quantizer = getattr(module, name, None)
            if isinstance(quantizer, _FakeQuantizer):
                yield quantizer


def is_prepared(model: nn.Module) -> bool:
    return any(True for _ in _quantizers(model))


def prepare_qat(model: nn.Module, scheme: Scheme) -> nn.Module:
    """Make every Linear of ``model`` and its word embeddings fake-quantisable (off until
    ``set_fake_quantize``). Call once, before ``torch.compile`` and FSDP sharding."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear, IntxFakeQuantizeConfig, QATConfig

    if is_prepared(model):
        return model
    if scheme.group_size is not None:  # ONNX Runtime's MatMulNBits takes groups of 16 or more
        narrow = [
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and group_for(m.in_features, scheme.group_size) < min(16, scheme.group_size)
        ]
        if narrow:
            raise ValueError(
                f"quantization.group_size={scheme.group_size}: the inputs of {narrow[:3]} have no power-of-two "
                "divisor of 16 or more to group by; int4_weight needs layers whose widths are multiples of 16"
            )
    # torchao's module swap; the placeholder config is replaced by our quantisers just below
    placeholder = QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int8, "per_channel"), step="prepare")
    word_embeddings = _word_embeddings(model)
    quantize_(
        model,
        placeholder,
        filter_fn=lambda m, fqn: isinstance(m, nn.Linear) or m is word_embeddings,
    )
    for module in model.modules():
        if isinstance(module, FakeQuantizedLinear):
            module.weight_fake_quantizer = WeightFakeQuantizer(
                scheme, scheme.weight_bits, scheme.group_size, scheme.weight_qmax
            )
            module.activation_fake_quantizer = ActivationFakeQuantizer(scheme) if scheme.dynamic_activations else None
        elif isinstance(module, FakeQuantizedEmbedding):
            module.weight_fake_quantizer = WeightFakeQuantizer(scheme, EMBEDDING_BITS, None)  # one scale per token
    log.info("Prepared the student for quantisation-aware training (%s)", scheme.name)
    return model


def _word_embeddings(model: nn.Module) -> Optional[nn.Embedding]:
    embeddings = getattr(model, "embeddings", None)
    return getattr(embeddings, "word_embeddings", None)


def set_fake_quantize(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantisation on or off everywhere in a prepared model."""
    for quantizer in _quantizers(model):
        quantizer.enabled = enabled


def convert_qat(model: nn.Module) -> nn.Module:
    """Plain ``nn.Linear`` / ``nn.Embedding`` modules again, holding the trained float weights."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear, QATConfig

    quantize_(
        model,
        QATConfig(step="convert"),
        filter_fn=lambda m, fqn: isinstance(m, (FakeQuantizedLinear, FakeQuantizedEmbedding)),
    )
    return model
