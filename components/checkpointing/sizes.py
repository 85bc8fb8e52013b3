"""Sizes from strangers: the one check every loader of this library makes (teachers, students,
fine-tuned models, transformers' Auto classes) before anything is allocated.

A ``config.json`` says how big a model is; the weights' headers say what it holds. A config
whose sizes the weights do not back, or that would build more than ``MAX_LAYERS`` layers or
``MAX_PARAMETERS`` parameters whatever the weights, is a one-line ``CheckpointError``
naming the file and the key, not a hang or an out-of-memory kill.
"""

import itertools
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from components.errors import CheckpointError

# Beyond these a config is a mistake or an attack: the largest published encoders have a few
# hundred layers and a few billion parameters.
MAX_LAYERS = 10_000
MAX_PARAMETERS = 10**11
# builder argument -> the config.json key transformers uses for it (the others are the same)
_HF_KEYS = {
    "num_layers": "num_hidden_layers",
    "num_iterations": "num_hidden_layers",
    "num_heads": "num_attention_heads",
}
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
    at most ``MAX_LAYERS`` layers and ``MAX_PARAMETERS`` parameters. Sizes the weights
    name no tensor for (``intermediate_size``...) are compared shape by shape once the model is
    laid out on the meta device (``check_shapes``).
    """

    def says(arg: str) -> str:
        return f"{config_file} says {config_key(arg, family)}={kwargs[arg]}"

    for arg, least in _SIZE_ARGS.items():
        if arg not in kwargs or (arg == "mlm_head_size" and kwargs[arg] is None):
            continue
        value = kwargs[arg]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise CheckpointError(
                f"{config_file}: {config_key(arg, family)} must be a whole number >= {least}, got {value!r}"
            )

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
    missing = sorted(name[: match.start(1)] + str(i) + name[match.end(1) :] for i in absent for name, match in template)
    extra = sorted(i for i in held if i >= n)
    detail = f": missing {missing[:8]}{'...' if len(missing) > 8 else ''}" if missing else ""
    detail += (
        f"{';' if detail else ':'} layers {extra[:8]}{'...' if len(extra) > 8 else ''} are beyond it" if extra else ""
    )
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
        blame = [
            f"{config_key(a, family)}={kwargs[a]}" for a in _SIZE_ARGS if kwargs.get(a) is not None and kwargs[a] in off
        ]
        raise CheckpointError(
            f"{where}: {name} has shape {tuple(shape)}, config implies {tuple(want)} "
            f"(in {weights}; {config_file} says {' or '.join(blame) if blame else 'otherwise'})"
        )
