"""Export a student to a Hugging Face-style folder, and load one back.

Every student family has a transformers format it is written in whenever it fits (the
``FORMATS`` table; a new family is one entry):

* an adapter-free recursive student with an ALBERT-shaped MLM head is an ALBERT checkpoint
  (``AlbertForMaskedLM.from_pretrained`` loads it and reproduces our logits); one without an
  MLM head (hidden-state distillation from an embedding teacher) is an ``AlbertModel``;
* a bottleneck student is a MobileBERT checkpoint (``MobileBertForMaskedLM``), except for
  IB-BERT-shaped attention, which transformers cannot build.

Loading either prints no "newly initialized" report: a headless ALBERT gets an identity pooler
(``albert``), a headless MobileBERT ``classifier_activation: false``, whose pooler has no weights.

Any other student (adapters, a MiniALBERT-style wide head) is written in our own format:
``config.json`` with ``model_type`` the family (``recursive_encoder``, ``bottleneck_encoder``)
and the builder arguments under that key, our weight names in ``model.safetensors``, and the
tokenizer; ``import components`` registers these types with transformers' Auto classes.
``load_student`` rebuilds every one exactly, and also reads published ALBERT (one shared
layer) and MobileBERT checkpoints, so they can start a distillation run.

The student of a sentence-embedding teacher (one with ``modules.json``) is also a
sentence-transformers folder (``components.checkpointing.sentence_transformers``).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from components.checkpointing import albert, mobilebert
from components.checkpointing.sentence_transformers import SentenceModules, write_sentence_modules
from components.checkpointing.sizes import check_config_sizes, check_shapes
from components.checkpointing.weights import weight_shapes
from components.errors import CheckpointError
from components.io import atomic_directory
from components.models.families import encoder_family, ENCODERS

NATIVE_MODEL_TYPE = "recursive_encoder"  # the recursive family's native model_type
FORMAT_VERSION = 1
# config.json key for what this library records about how a student was made (training
# metadata: transformers keeps unknown config keys, so ALBERT exports carry it too)
METADATA_KEY = "recursive_distill"


@dataclass(frozen=True)
class HFFormat:
    """How one student family is written as a transformers model."""

    family: str  # key of components.models.families.ENCODERS
    model_type: str  # transformers' model_type
    config_class: str  # transformers config class name
    fits: Callable[[Dict], bool]  # whether a student's builder arguments are expressible
    config_kwargs: Callable[[Dict], Dict]  # builder arguments -> transformers config kwargs
    builder_kwargs: Callable[[Dict], Dict]  # transformers config.json -> builder arguments
    to_hf: Callable[[Dict, Dict], Dict]  # (our state, builder arguments) -> transformers state
    from_hf: Callable[[Dict, Dict], Dict]  # (transformers state, builder arguments) -> ours


def _albert_fits(c: Dict) -> bool:
    return (
        c["adapter_placement"] is None
        and not c.get("iteration_embeddings")
        and (not c["mlm_head"] or c["mlm_head_size"] == c["embedding_size"])
    )


def _albert_from_hf(state: Dict, kwargs: Dict) -> Dict:
    state = albert.albert_to_native(state, kwargs)
    if kwargs["embedding_size"] == kwargs["hidden_size"]:  # ALBERT keeps a Linear we do not have
        eye = torch.eye(kwargs["hidden_size"])
        if not torch.allclose(state.pop("projector.weight"), eye) or state.pop("projector.bias").any():
            raise CheckpointError(
                "an ALBERT with E == H and a non-identity embedding projection is not a recursive student"
            )
    return state


def _mobilebert_config_kwargs(c: Dict) -> Dict:
    # a MobileBertModel's pooler is a fresh Linear unless classifier_activation is off: then it is
    # the [CLS] state itself, and a headless student has nothing for transformers to invent
    return {**mobilebert.mobilebert_config_kwargs(c), **({} if c["mlm_head"] else {"classifier_activation": False})}


FORMATS = {
    "albert": HFFormat(
        "recursive_encoder",
        "albert",
        "AlbertConfig",
        _albert_fits,
        albert.albert_config_kwargs,
        albert.recursive_kwargs_from_albert,
        albert.native_to_albert,
        _albert_from_hf,
    ),
    "mobilebert": HFFormat(
        "bottleneck_encoder",
        "mobilebert",
        "MobileBertConfig",
        mobilebert.is_mobilebert_compatible,
        _mobilebert_config_kwargs,
        mobilebert.bottleneck_kwargs_from_mobilebert,
        mobilebert.native_to_mobilebert,
        mobilebert.mobilebert_to_native,
    ),
}


# every config.json model_type load_student reads: native families and transformers formats
STUDENT_MODEL_TYPES = frozenset({f.family for f in FORMATS.values()} | set(FORMATS))


def hf_format(model: nn.Module) -> Optional[str]:
    """The transformers format ``model`` can be written in, or ``None``."""
    family = encoder_family(model)
    return next((name for name, f in FORMATS.items() if f.family == family and f.fits(model.config)), None)


def _native_state(model: nn.Module) -> dict:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.get("tie_word_embeddings"):
        state.pop("mlm_head.decoder.weight", None)  # safetensors refuses shared tensors
    return state


def save_student(
    model: nn.Module,
    folder: Path,
    tokenizer=None,
    format: str = "auto",
    metadata: Optional[dict] = None,
    sentence_modules: Optional[SentenceModules] = None,
) -> str:
    """Write ``model`` (and ``tokenizer``) to ``folder`` atomically; returns the format used.

    Args:
        format: ``"auto"`` (the family's transformers format whenever the student fits it),
            ``"native"``, or a transformers format by name (``"albert"``, ``"mobilebert"``).
        metadata: how the student was made (e.g. ``{"quantization_aware": {...}}``), saved in
            ``config.json`` under ``"recursive_distill"``; see ``student_metadata``.
        sentence_modules: a sentence-embedding teacher's pipeline (``read_sentence_modules``):
            the folder becomes a sentence-transformers model too, with this student as its
            Transformer module.
    """
    family = encoder_family(model)
    fits = hf_format(model)
    if format == "auto":
        format = fits or "native"
    if format != "native":
        if format not in FORMATS:
            raise ValueError(f"Unknown student format {format!r}; use 'auto', 'native' or one of {sorted(FORMATS)}")
        if format != fits:
            raise ValueError(
                f"This {type(model).__name__} cannot be written as {format!r} "
                f"({'it fits ' + repr(fits) if fits else 'it fits no transformers format'}); "
                "export it with format='native'"
            )
    state = _native_state(model)
    with atomic_directory(Path(folder), "student") as tmp:
        if format != "native":
            spec = FORMATS[format]
            extra = {METADATA_KEY: metadata} if metadata else {}
            getattr(transformers, spec.config_class)(**spec.config_kwargs(model.config), **extra).save_pretrained(
                str(tmp)
            )
            save_file(spec.to_hf(state, model.config), str(tmp / "model.safetensors"), {"format": "pt"})
        else:
            config = {
                "model_type": family,
                # the transformers class that loads it (components.checkpointing.auto)
                "architectures": [_auto_class_name(family, model.config.get("mlm_head", False))],
                "format_version": FORMAT_VERSION,
                family: model.config,
            }
            if metadata:
                config[METADATA_KEY] = metadata
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_file(state, str(tmp / "model.safetensors"), {"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if sentence_modules is not None:
            positions = model.config.get("max_position_embeddings")
            write_sentence_modules(sentence_modules, tmp, model.spec.hidden_size, positions)
    return format


def class_prefix(model_type: str) -> str:
    """The transformers class names of a native model type start with this (``recursive_encoder``
    -> ``RecursiveEncoder``ForMaskedLM...); components.checkpointing.auto uses the same rule."""
    return "".join(part.title() for part in model_type.split("_"))


def _auto_class_name(family: str, mlm_head: bool) -> str:
    return class_prefix(family) + ("ForMaskedLM" if mlm_head else "Model")


def student_metadata(path: str) -> dict:
    """What ``save_student`` recorded about how the student in ``path`` was made."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get(METADATA_KEY) or {}
    except (OSError, ValueError):
        return {}


def load_student(path: str, **overrides) -> nn.Module:
    """Rebuild a student from a folder written by ``save_student``, or from a published
    checkpoint of a family's transformers format (ALBERT with one shared layer, MobileBERT).
    ``overrides`` change builder arguments that do not touch the saved weights' shapes:
    dropout, say, or ``adapter_placement`` to add fresh adapters to an adapter-free student.

    Folders may come from strangers: the config's sizes are checked against the weights' header
    (``check_config_sizes``, the teacher loader's check)
    before the weights are read, and the student is laid out on the meta device and compared
    name by name and shape by shape before it is allocated."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"No student at {folder}: {config_file} does not exist")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in STUDENT_MODEL_TYPES:
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} is not a student (expected one of {sorted(STUDENT_MODEL_TYPES)})"
        )
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"No weights for the student at {folder}: {weights} does not exist")
    native = model_type in ENCODERS  # our native format
    if native:
        family, kwargs = model_type, config.get(model_type)
        if not isinstance(kwargs, dict):
            raise CheckpointError(f"{config_file}: {model_type!r} must hold the builder arguments, got {kwargs!r}")
    else:
        spec = FORMATS[model_type]
        family = spec.family
        try:
            kwargs = spec.builder_kwargs(config)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{config_file}: {e}") from e
    check_config_sizes(config_file, kwargs, weight_shapes(folder), weights, family=model_type if native else None)
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise CheckpointError(f"Could not read {weights}: {e}") from e
    if native:
        if state and all(k.startswith("encoder.") for k in state):  # saved by transformers' save_pretrained
            state = {k[len("encoder.") :]: v for k, v in state.items()}
    else:
        try:
            state = spec.from_hf(state, kwargs)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{folder}: {e}") from e
    build = {**kwargs, **overrides}
    try:
        with torch.device("meta"):  # the layout, to compare with the weights before allocating
            layout = ENCODERS[family](**build)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_file}: cannot build a {family} from it: {e}") from e
    if not layout.config["mlm_head"]:  # left out on purpose (fine-tuning does not use it)
        state = {k: v for k, v in state.items() if not k.startswith("mlm_head.")}
    tied = kwargs.get("tie_word_embeddings") and layout.config["mlm_head"]
    if tied:
        state.pop("mlm_head.decoder.weight", None)
    expected = {k: tuple(v.shape) for k, v in layout.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if tied:
        missing = [k for k in missing if k != "mlm_head.decoder.weight"]
    if kwargs.get("adapter_placement", "none") is None:
        # adapters added to an adapter-free student (overrides) keep their initialisation
        missing = [k for k in missing if not k.startswith("adapters.")]
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match its config: missing {missing}, unexpected {unexpected}")
    check_shapes(
        expected,
        {k: tuple(v.shape) for k, v in state.items()},
        str(folder),
        config_file,
        weights,
        kwargs,
        family=model_type if native else None,
    )
    model = ENCODERS[family](**build)
    model.load_state_dict(state, strict=False)
    return model
