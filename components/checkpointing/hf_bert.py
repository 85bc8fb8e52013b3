"""Load Hugging Face BERT-family checkpoints (BERT, BioBERT, RoBERTa, XLM-R, CamemBERT)
into :class:`components.models.bert.BertEncoder`.

Config and tokenizer go through ``AutoConfig`` / ``AutoTokenizer.from_pretrained``; weights
are read with safetensors, or ``torch.load(weights_only=True)`` for ``.bin`` files, and their
names mapped onto ours. Nothing here runs code from a checkpoint.
"""

import functools
import json
import os
import re
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from components.checkpointing.io import looks_like_local_path
from components.errors import CheckpointError
from components.models.bert import BertEncoder

# model_type -> the family whose weight names and position numbering it uses
SUPPORTED_MODEL_TYPES = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
}

# Files worth fetching from the Hub: config and tokenizer, then one format of weights.
HUB_PATTERNS = ["*.json", "*.txt", "*.model"]

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
_IGNORED = re.compile(
    r"(^pooler\.|^cls\.seq_relationship\.|position_ids$|token_type_ids$|^classifier\.)"
)


def resolve_checkpoint_dir(path_or_id: str, revision: Optional[str] = None) -> Path:
    """A local folder as is, or a Hub model id downloaded to the local cache."""
    path = Path(os.path.expanduser(str(path_or_id)))
    if path.is_dir():
        return path
    text = str(path_or_id)
    if looks_like_local_path(text):
        raise CheckpointError(f"Checkpoint folder not found: {text}")
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = list_repo_files(text, revision=revision)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        return Path(snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS + weights))
    except Exception as e:  # offline, unknown id, gated repo, ...
        raise CheckpointError(
            f"{text!r} is not a local folder, and fetching it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e}). Download the checkpoint to a folder and pass that path."
        ) from e


def weight_files(folder: Path) -> Tuple[str, list]:
    """("safetensors" | "bin", files) for a model folder, sharded or not."""
    for kind, single, index in (
        ("safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / single).is_file():
            return kind, [folder / single]
        if (folder / index).is_file():
            shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{folder / index} lists shards that are missing: {missing}")
            return kind, [folder / s for s in shards]
    raise CheckpointError(
        f"No weights in {folder}: expected model.safetensors, pytorch_model.bin, or a sharded index"
    )


def _read_bin(file: Path) -> Dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        # files saved before torch 1.6 (common for BioBERT-era checkpoints) cannot be mapped
        return torch.load(file, map_location="cpu", weights_only=True)


def _lazy_tensors(folder: Path) -> Iterator[Tuple[str, Callable[[], torch.Tensor]]]:
    """(name, read) for every tensor of a checkpoint; ``read()`` loads that one tensor (call it
    before advancing). safetensors are read one tensor at a time; .bin files are memory-mapped
    (files saved before torch 1.6 cannot be, and load whole)."""
    kind, files = weight_files(folder)
    for file in files:
        try:
            if kind == "safetensors":
                from safetensors import safe_open

                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        yield name, functools.partial(f.get_tensor, name)
            else:
                for name, tensor in _read_bin(file).items():
                    yield name, functools.partial(lambda t: t, tensor)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"Could not read weights from {file}: {e}") from e


def weight_names(folder: Path) -> List[str]:
    """Names of every tensor of a checkpoint, without reading the tensors."""
    return [name for name, _ in _lazy_tensors(folder)]


def iter_weights(folder: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a checkpoint, one tensor at a time."""
    for name, read in _lazy_tensors(folder):
        try:
            tensor = read()
        except Exception as e:
            raise CheckpointError(f"Could not read {name} from the weights in {folder}: {e}") from e
        yield name, tensor


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
            f"model_type {model_type!r} is not supported as a teacher; supported: "
            f"{sorted(SUPPORTED_MODEL_TYPES)}"
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
    rank's shard and dropped, so no rank ever holds more than its shard plus one tensor.
    """
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        hf_config = AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"Could not read {folder / 'config.json'}: {e}") from e
    kwargs = encoder_kwargs(hf_config)
    # XLM-R and CamemBERT keep RoBERTa's module names, under the "roberta." prefix too.
    prefix = SUPPORTED_MODEL_TYPES[hf_config.model_type]

    def wanted(hf_name: str) -> Optional[str]:
        name = native_name(hf_name, prefix)
        return None if name is None or (not mlm_head and name.startswith("mlm_head.")) else name

    names = {wanted(n) for n in weight_names(folder)} - {None}
    has_head = any(n.startswith("mlm_head.dense.") for n in names)
    with torch.device("meta"):
        encoder = BertEncoder(**kwargs, mlm_head=has_head)
    if shard is not None:
        shard(encoder)
    expected = encoder.state_dict()
    tie_decoder = has_head and "mlm_head.decoder.weight" not in names
    if tie_decoder and not getattr(hf_config, "tie_word_embeddings", True):
        raise CheckpointError(f"{folder}: the MLM decoder weight is missing and not tied")
    missing = sorted(set(expected) - names - ({"mlm_head.decoder.weight"} if tie_decoder else set()))
    unexpected = sorted(names - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{folder} does not match a {hf_config.model_type} encoder: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )

    from torch.distributed.tensor import distribute_tensor, DTensor

    state: Dict[str, torch.Tensor] = {}
    for hf_name, tensor in iter_weights(folder):
        name = wanted(hf_name)
        if name is None:
            continue
        target = expected[name]
        if tensor.shape != target.shape:
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


# Any one of these gives a tokenizer its vocabulary.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
)


def load_tokenizer(folder: Path, vocab_size: int, needs_mask: bool = False):
    """The tokenizer of a model folder, checked against the model's ``vocab_size``."""
    from transformers import AutoTokenizer

    # transformers quietly builds a 5-token tokenizer when a folder has no vocabulary files
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"Could not load the tokenizer from {folder}: none of {list(TOKENIZER_FILES)} is there"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"Could not load the tokenizer from {folder}: {e}") from e
    if tokenizer.pad_token_id is None or (needs_mask and tokenizer.mask_token_id is None):
        raise CheckpointError(
            f"{folder}: the tokenizer has no {'pad' if tokenizer.pad_token_id is None else 'mask'} token; "
            "batches need a pad token and masked-LM distillation a mask token (every BERT-family tokenizer defines both)"
        )
    if not 0.9 * vocab_size <= len(tokenizer) <= vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model {vocab_size} embeddings; "
            "the tokenizer files do not belong to these weights"
        )
    return tokenizer
