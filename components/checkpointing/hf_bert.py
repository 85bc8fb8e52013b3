"""Load Hugging Face BERT-family checkpoints (BERT, BioBERT, RoBERTa, XLM-R, CamemBERT)
into :class:`components.models.bert.BertEncoder`.

Config and tokenizer go through ``AutoConfig`` / ``AutoTokenizer.from_pretrained``; weights
are read with safetensors, or ``torch.load(weights_only=True)`` for ``.bin`` files, and their
names mapped onto ours. Nothing here runs code from a checkpoint.

Model folders come from strangers, so nothing is built from a ``config.json`` before its sizes
have been checked against the weight files (:func:`check_config_sizes`, shared with the student
loader): a config that would allocate terabytes or build 10^8 layers is a one-line error naming
the key, not an out-of-memory kill. A shard index may only name files inside its folder, and a
Hub id already in the local Hugging Face cache loads offline.
"""

import functools
import itertools
import json
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

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
    """A local folder as is, or a Hub model id: downloaded to the local Hugging Face cache, or
    read from that cache when offline (``HF_HUB_OFFLINE=1``) or when the Hub cannot be reached."""
    path = Path(os.path.expanduser(str(path_or_id)))
    if path.is_dir():
        return path
    text = str(path_or_id)
    if looks_like_local_path(text):
        raise CheckpointError(f"Checkpoint folder not found: {text}")
    from huggingface_hub import list_repo_files, snapshot_download

    if _hub_offline():
        return _cached_snapshot(text, revision, "HF_HUB_OFFLINE is set")
    try:
        files = list_repo_files(text, revision=revision)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        return Path(snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS + weights))
    except Exception as e:  # no connection, unknown id, gated repo, ...: the cache may still hold it
        return _cached_snapshot(text, revision, f"{type(e).__name__}: {e}", cause=e)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or any(f in {"1", "ON", "YES", "TRUE"} for f in flags)


def _cached_snapshot(repo_id: str, revision: Optional[str], why: str, cause: Optional[Exception] = None) -> Path:
    """The folder of ``repo_id`` in the local Hugging Face cache, without touching the network."""
    from huggingface_hub import constants, snapshot_download

    try:
        # only config and tokenizer patterns: weight_files says which weights are missing, if any
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True))
        if (folder / "config.json").is_file():
            return folder
        problem = f"the cached snapshot {folder} has no config.json"
    except Exception as e:
        problem = f"it is not in the local Hugging Face cache {constants.HF_HUB_CACHE} ({type(e).__name__})"
    raise CheckpointError(
        f"{repo_id!r} is not a local folder, and fetching it from the Hugging Face Hub failed ({why}); "
        f"{problem}. Download it once while online (e.g. `hf download {repo_id}`), or pass the path "
        "of a folder that holds it."
    ) from cause


# Index files of sharded checkpoints, and what each shard is.
_FORMATS = (
    ("safetensors", "model.safetensors", "model.safetensors.index.json"),
    ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def weight_files(folder: Path) -> Tuple[str, list]:
    """("safetensors" | "bin", files) for a model folder, sharded or not."""
    return _weight_files(folder)[:2]


def _weight_files(folder: Path) -> Tuple[str, list, Path]:
    """(kind, files, what to name in messages: the single file or the shard index)."""
    for kind, single, index in _FORMATS:
        if (folder / single).is_file():
            return kind, [folder / single], folder / single
        if (folder / index).is_file():
            shards = _read_index(folder, folder / index)
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{folder / index} lists shards that are missing: {missing}")
            return kind, [folder / s for s in shards], folder / index
    raise CheckpointError(
        f"No weights in {folder}: expected model.safetensors, pytorch_model.bin, or a sharded index"
    )


def _read_index(folder: Path, index: Path) -> List[str]:
    """The shard files a ``*.index.json`` names, each checked to stay inside ``folder``."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index} is not a readable JSON shard index: {e}") from e
    except (KeyError, TypeError):
        raise CheckpointError(f'{index} is not a shard index: it has no "weight_map"') from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f'{index}: "weight_map" must map weight names to shard files, got {type(weight_map).__name__}')
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise CheckpointError(f'{index}: "weight_map" entry {bad[0]!r} names no shard file: {bad[1]!r}')
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        _check_shard_path(folder, index, shard)
    return shards


def _check_shard_path(folder: Path, index: Path, shard: str) -> None:
    """A shard must be a file of ``folder`` (or below): a stranger's index naming ``/etc/...``,
    ``../..`` or a link out of the folder would make us read (and report on) any file."""
    pure = PurePosixPath(shard)
    if pure.is_absolute() or PureWindowsPath(shard).drive or PureWindowsPath(shard).root or ".." in pure.parts or "\0" in shard:
        raise CheckpointError(f"{index} names a shard outside {folder}: {shard!r}; shards must be files in the folder")
    target = (folder / shard).resolve()
    roots = [folder.resolve()]
    # a Hub download: snapshots/<commit>/ holds links into the repository's blobs/
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        roots.append((folder.parent.parent / "blobs").resolve())
    if not any(target == root or root in target.parents for root in roots):
        raise CheckpointError(
            f"{index} names a shard outside {folder}: {shard!r} resolves to {target}; shards must be files in the folder"
        )


def _read_bin(file: Path) -> Dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        # files saved before torch 1.6 (common for BioBERT-era checkpoints) cannot be mapped
        return torch.load(file, map_location="cpu", weights_only=True)


def _lazy_tensors(folder: Path) -> Iterator[Tuple[str, Tuple[int, ...], Callable[[], torch.Tensor]]]:
    """(name, shape, read) for every tensor of a checkpoint; ``read()`` loads that one tensor
    (call it before advancing). safetensors shapes come from the file header and tensors are read
    one at a time; .bin files are memory-mapped (files saved before torch 1.6 cannot be, and load
    whole)."""
    kind, files = weight_files(folder)
    for file in files:
        try:
            if kind == "safetensors":
                from safetensors import safe_open

                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        yield name, tuple(f.get_slice(name).get_shape()), functools.partial(f.get_tensor, name)
            else:
                for name, tensor in _read_bin(file).items():
                    if not isinstance(tensor, torch.Tensor):
                        raise TypeError(f"{name} is a {type(tensor).__name__}, not a tensor")
                    yield name, tuple(tensor.shape), functools.partial(lambda t: t, tensor)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"Could not read weights from {file}: {e}") from e


def weight_shapes(folder: Path) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor of a checkpoint, without reading the tensors."""
    return {name: shape for name, shape, _ in _lazy_tensors(folder)}


def weight_names(folder: Path) -> List[str]:
    """Names of every tensor of a checkpoint, without reading the tensors."""
    return list(weight_shapes(folder))


def iter_weights(folder: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a checkpoint, one tensor at a time."""
    for name, _, read in _lazy_tensors(folder):
        try:
            tensor = read()
        except Exception as e:
            raise CheckpointError(f"Could not read {name} from the weights in {folder}: {e}") from e
        yield name, tensor


# ------------------------------------------------------------------ sizes from strangers
# Beyond these a config is a mistake or an attack: the largest published encoders have a few
# hundred layers and a few billion parameters.
MAX_LAYERS = 10_000
MAX_PARAMETERS = 10**11
# builder argument -> the config.json key transformers uses for it (the others are the same)
_HF_KEYS = {"num_layers": "num_hidden_layers", "num_iterations": "num_hidden_layers", "num_heads": "num_attention_heads"}
# builder arguments that size tensors or count modules (of every family), with their least value
_SIZE_ARGS = {
    "vocab_size": 1,
    "embedding_size": 1,
    "hidden_size": 1,
    "intra_bottleneck_size": 1,
    "intermediate_size": 1,
    "num_heads": 1,
    "num_layers": 1,
    "num_iterations": 1,
    "num_feedforward_networks": 1,
    "max_position_embeddings": 1,
    "type_vocab_size": 0,
    "mlm_head_size": 1,
    "adapter_reduction_factor": 1,
}
# the index of a stacked layer in a weight name: ours (layers.N., blocks.N.) and transformers' (layer.N.)
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|blocks)\.(\d+)\.")


def config_key(arg: str, family: Optional[str] = None) -> str:
    """The config.json key holding builder argument ``arg``: ``family.arg`` in our native format
    (the builder arguments are saved under the family's name), else transformers' name."""
    return f"{family}.{arg}" if family else _HF_KEYS.get(arg, arg)


def implied_parameters(kwargs: Mapping[str, Any]) -> int:
    """An over-estimate of the parameters an encoder built from ``kwargs`` holds, for every family
    (BERT, recursive, bottleneck): good enough to refuse absurd configs before building anything."""

    def get(arg: str, default: int = 1) -> int:
        value = kwargs.get(arg)
        return value if isinstance(value, int) and value > 0 else default

    h = get("hidden_size")
    e = get("embedding_size", h)
    m = get("mlm_head_size", e)
    b = get("intra_bottleneck_size", h)
    i = get("intermediate_size")
    w = max(e, h)
    stored_layers = get("num_layers")  # a recursive encoder stores its one shared layer
    layer = 4 * w * w + 2 * w * i + get("num_feedforward_networks") * 2 * b * i + 4 * w * b
    embeddings = (get("vocab_size") + get("max_position_embeddings") + get("type_vocab_size")) * w + 3 * e * h
    head = get("vocab_size") * m + m * w
    return embeddings + stored_layers * layer + head


def check_config_sizes(
    config_file: Path,
    kwargs: Mapping[str, Any],
    shapes: Optional[Mapping[str, Tuple[int, ...]]],
    weights: Path,
    family: Optional[str] = None,
) -> None:
    """Refuse builder arguments read from ``config_file`` that the weights do not back, before
    anything is allocated. The one check both the teacher and the student loaders make.

    ``kwargs`` are the builder arguments of any encoder family; ``shapes`` the weight names and
    shapes (from the safetensors header, nothing read), or ``None`` where they are not known;
    ``weights`` the file (or shard index) to name in messages; ``family`` set for our native
    format, whose keys are ``family.arg``. Checked: every size is a whole number; the word
    embeddings have ``vocab_size`` rows and ``embedding_size`` (else ``hidden_size``) columns;
    position and token-type embeddings have ``max_position_embeddings`` and ``type_vocab_size``
    rows; the stacked layers held are exactly ``num_hidden_layers``; and, whatever the weights,
    at most :data:`MAX_LAYERS` layers and :data:`MAX_PARAMETERS` parameters. Sizes the weights
    name no tensor for (``intermediate_size``...) are compared shape by shape once the model is
    laid out on the meta device (:func:`check_shapes`).
    """

    def says(arg: str) -> str:
        return f"{config_file} says {config_key(arg, family)}={kwargs[arg]}"

    for arg, least in _SIZE_ARGS.items():
        if arg not in kwargs or (arg == "mlm_head_size" and kwargs[arg] is None):
            continue
        value = kwargs[arg]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise CheckpointError(f"{config_file}: {config_key(arg, family)} must be a whole number >= {least}, got {value!r}")

    if shapes is not None:
        width = "embedding_size" if "embedding_size" in kwargs else "hidden_size"
        for suffix, checks in (
            ("word_embeddings.weight", (("vocab_size", 0, "rows"), (width, 1, "columns"))),
            ("position_embeddings.weight", (("max_position_embeddings", 0, "rows"),)),
            ("token_type_embeddings.weight", (("type_vocab_size", 0, "rows"),)),
        ):
            name = next((n for n in shapes if n == suffix or n.endswith("." + suffix)), None)
            for arg, dim, what in checks if name is not None else ():
                shape = shapes[name]
                if arg in kwargs and (len(shape) != 2 or shape[dim] != kwargs[arg]):
                    held = f"{shape[dim]} {what}" if len(shape) == 2 else f"shape {shape}"
                    raise CheckpointError(f"{says(arg)} but {weights} holds {name} with {held}")
        if "num_layers" in kwargs:  # stacked layers, each stored (a recursive encoder reuses one)
            _check_layer_count(says("num_layers"), kwargs["num_layers"], shapes, weights)

    layers = kwargs.get("num_layers", kwargs.get("num_iterations"))
    if isinstance(layers, int) and layers > MAX_LAYERS:
        arg = "num_layers" if "num_layers" in kwargs else "num_iterations"
        raise CheckpointError(f"{says(arg)}: more than {MAX_LAYERS} layers is refused")
    if isinstance(layers, int) and layers * kwargs.get("num_feedforward_networks", 1) > MAX_LAYERS:
        raise CheckpointError(
            f"{says('num_feedforward_networks')} with {layers} layers: more than {MAX_LAYERS} feed-forward blocks is refused"
        )
    estimate = implied_parameters(kwargs)
    if estimate > MAX_PARAMETERS:
        largest = sorted((a for a in _SIZE_ARGS if kwargs.get(a) is not None), key=lambda a: -kwargs[a])[:2]
        sizes = ", ".join(f"{config_key(a, family)}={kwargs[a]}" for a in largest)
        raise CheckpointError(
            f"{config_file} implies about {estimate:.1e} parameters (its largest sizes: {sizes}); "
            f"more than {MAX_PARAMETERS:.0e} is refused"
        )


def _check_layer_count(says: str, n: int, shapes: Mapping[str, Tuple[int, ...]], weights: Path) -> None:
    held: Dict[int, List[Tuple[str, re.Match]]] = {}
    for name in shapes:
        match = _LAYER_INDEX.search(name)
        if match:
            held.setdefault(int(match.group(1)), []).append((name, match))
    if not held or (len(held) == n and max(held) == n - 1):
        return
    # what the first missing layers would hold, named like the layers that are there
    template = held[min(held)]
    absent = itertools.islice((i for i in range(n) if i not in held), 2)
    missing = sorted(
        name[: match.start(1)] + str(i) + name[match.end(1) :] for i in absent for name, match in template
    )
    extra = sorted(i for i in held if i >= n)
    detail = f": missing {missing[:8]}{'...' if len(missing) > 8 else ''}" if missing else ""
    detail += f"{';' if detail else ':'} layers {extra[:8]}{'...' if len(extra) > 8 else ''} are beyond it" if extra else ""
    raise CheckpointError(f"{says} but {weights} holds {len(held)} layers{detail}")


def check_shapes(
    expected: Mapping[str, Tuple[int, ...]],
    found: Mapping[str, Tuple[int, ...]],
    where: str,
    config_file: Path,
    weights: Path,
    kwargs: Mapping[str, Any],
    family: Optional[str] = None,
) -> None:
    """Every tensor in ``found`` (the weights) has the shape the model laid out from ``kwargs``
    (``expected``, on the meta device) gives it; a mismatch names the config key to blame."""
    for name, shape in found.items():
        want = expected.get(name)
        if want is None or tuple(want) == tuple(shape):
            continue
        off = set(want) - set(shape)
        blame = [f"{config_key(a, family)}={kwargs[a]}" for a in _SIZE_ARGS if kwargs.get(a) is not None and kwargs[a] in off]
        raise CheckpointError(
            f"{where}: {name} has shape {tuple(shape)}, config implies {tuple(want)} "
            f"(in {weights}; {config_file} says {' or '.join(blame) if blame else 'otherwise'})"
        )


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
    rank's shard and dropped, so no rank ever holds more than its shard plus one tensor. Before
    anything is built, the config's sizes are checked against the weights' shapes
    (:func:`check_config_sizes`), and every shape before any tensor is read.
    """
    from transformers import AutoConfig

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

    weights = _weight_files(folder)[2]
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

    from torch.distributed.tensor import distribute_tensor, DTensor

    state: Dict[str, torch.Tensor] = {}
    for hf_name, tensor in iter_weights(folder):
        name = wanted(hf_name)
        if name is None:
            continue
        target = expected[name]
        if tensor.shape != target.shape:  # the file changed under us since its header was read
            raise CheckpointError(f"{folder}: {name} has shape {tuple(tensor.shape)}, config implies {tuple(target.shape)}")
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
