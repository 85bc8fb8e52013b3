"""Load Hugging Face BERT-family checkpoints (BERT, BioBERT, RoBERTa, XLM-R, CamemBERT)
into ``components.models.bert.BertEncoder``.

The config goes through ``AutoConfig``; weights are read with safetensors, or
``torch.load(weights_only=True)`` for ``.bin`` files (``weights``),
and their names mapped onto ours. Nothing here runs code from a checkpoint, and nothing is built
from a ``config.json`` before its sizes have been checked against the weight files
(``sizes``).
"""

import re
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.distributed.tensor import distribute_tensor, DTensor
from transformers import AutoConfig

from components.checkpointing.sizes import check_config_sizes, check_shapes
from components.checkpointing.weights import find_weights, iter_weights, weight_shapes
from components.errors import CheckpointError
from components.models.bert import BertEncoder

# model_type -> the family whose weight names and position numbering it uses
SUPPORTED_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
}

_RENAMES = [
    # old TF-converted checkpoints name LayerNorm parameters gamma/beta
    (r"\.gamma$", ".weight"),
    (r"\.beta$", ".bias"),
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.attention.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.output."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.ffn_in."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.ffn_out."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ffn_norm."),
    # BERT's MLM head
    (r"^cls\.predictions\.transform\.dense\.", "mlm_head.dense."),
    (r"^cls\.predictions\.transform\.LayerNorm\.", "mlm_head.norm."),
    (r"^cls\.predictions\.decoder\.", "mlm_head.decoder."),
    (r"^cls\.predictions\.bias$", "mlm_head.decoder.bias"),
    # RoBERTa's MLM head
    (r"^lm_head\.dense\.", "mlm_head.dense."),
    (r"^lm_head\.layer_norm\.", "mlm_head.norm."),
    (r"^lm_head\.decoder\.", "mlm_head.decoder."),
    (r"^lm_head\.bias$", "mlm_head.decoder.bias"),
]
# Present in many checkpoints, unused by an encoder teacher.
_IGNORED = re.compile(r"(^pooler\.|^cls\.seq_relationship\.|position_ids$|token_type_ids$|^classifier\.)")


def native_name(hf_name: str, prefix: str) -> Optional[str]:
    """Our parameter name for a Hugging Face one; ``None`` for tensors a teacher ignores."""
    name = hf_name[len(prefix) + 1 :] if hf_name.startswith(prefix + ".") else hf_name
    if _IGNORED.search(name):
        return None
    for pattern, replacement in _RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def encoder_kwargs(hf_config) -> Dict:
    """``BertEncoder`` arguments for a transformers config of a supported family."""
    model_type = getattr(hf_config, "model_type", None)
    family = SUPPORTED_MODEL_TYPES.get(model_type)
    if family is None:
        raise CheckpointError(
            f"model_type {model_type!r} is not supported as a teacher; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"Only absolute position embeddings are supported, got {hf_config.position_embedding_type!r}"
        )
    return dict(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        activation=hf_config.hidden_act,
        # RoBERTa's LM head hard-codes exact GELU whatever hidden_act says.
        mlm_head_activation="gelu" if family == "roberta" else None,
        dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob,
        layer_norm_eps=hf_config.layer_norm_eps,
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
        # RoBERTa numbers positions from pad_token_id + 1.
        position_offset=(hf_config.pad_token_id + 1) if family == "roberta" else 0,
    )


def load_hf_encoder(
    folder: Path,
    dtype: torch.dtype = torch.float32,
    shard: Optional[Callable[[BertEncoder], None]] = None,
    mlm_head: bool = True,
) -> Tuple[BertEncoder, object]:
    """Build a ``BertEncoder`` from a local Hugging Face folder; returns (encoder, hf_config).
    ``mlm_head=False`` leaves out the checkpoint's MLM head (fine-tuning does not use it).

    The encoder is built on the meta device and filled tensor by tensor. With ``shard`` (which
    applies FSDP2's ``fully_shard`` to the meta encoder), each full tensor is read, cut to this
    rank's shard and dropped, so no rank ever holds more than its shard plus one tensor. Before
    anything is built, the config's sizes are checked against the weights' shapes
    (``check_config_sizes``), and every shape before any tensor is read.
    """
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        hf_config = AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"Could not read {config_file}: {e}") from e
    kwargs = encoder_kwargs(hf_config)
    # XLM-R and CamemBERT keep RoBERTa's module names, under the "roberta." prefix too.
    prefix = SUPPORTED_MODEL_TYPES[hf_config.model_type]

    def wanted(hf_name: str) -> Optional[str]:
        name = native_name(hf_name, prefix)
        return None if name is None or (not mlm_head and name.startswith("mlm_head.")) else name

    weights = find_weights(folder)[2]
    shapes = {wanted(n): shape for n, shape in weight_shapes(folder).items()}
    shapes.pop(None, None)
    check_config_sizes(config_file, kwargs, shapes, weights)
    names = set(shapes)
    has_head = any(n.startswith("mlm_head.dense.") for n in names)
    with torch.device("meta"):
        encoder = BertEncoder(**kwargs, mlm_head=has_head)
    if shard is not None:
        shard(encoder)
    expected = encoder.state_dict()
    tie_decoder = has_head and "mlm_head.decoder.weight" not in names
    if tie_decoder and not getattr(hf_config, "tie_word_embeddings", True):
        raise CheckpointError(f"{folder}: the MLM decoder weight is missing from {weights} and not tied")
    missing = sorted(set(expected) - names - ({"mlm_head.decoder.weight"} if tie_decoder else set()))
    unexpected = sorted(names - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{folder} does not match a {hf_config.model_type} encoder: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} (weights: {weights})"
        )
    check_shapes({k: tuple(v.shape) for k, v in expected.items()}, shapes, str(folder), config_file, weights, kwargs)

    state: Dict[str, torch.Tensor] = {}
    for hf_name, tensor in iter_weights(folder):
        name = wanted(hf_name)
        if name is None:
            continue
        target = expected[name]
        if tensor.shape != target.shape:  # the file changed under us since its header was read
            raise CheckpointError(
                f"{folder}: {name} has shape {tuple(tensor.shape)}, config implies {tuple(target.shape)}"
            )
        tensor = tensor.to(dtype)
        if isinstance(target, DTensor):  # keep only this rank's shard
            tensor = distribute_tensor(
                tensor.to(target.device_mesh.device_type), target.device_mesh, target.placements, src_data_rank=None
            )
        state[name] = tensor
    if tie_decoder:
        state["mlm_head.decoder.weight"] = state["embeddings.word_embeddings.weight"]
    encoder.load_state_dict(state, assign=True)
    return encoder, hf_config
