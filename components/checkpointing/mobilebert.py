"""Weight names between a ``BottleneckEncoder`` and transformers' MobileBERT.

A bottleneck student *is* ``MobileBertForMaskedLM`` (``MobileBertModel`` without a head), so
conversion is a renaming, per block, plus three things transformers builds but never uses:

* under ``use_bottleneck_attention`` with ``key_query_shared_bottleneck`` it still builds the
  shared query/key bottleneck (``bottleneck.attention``): written as zeros (norm weight ones);
* without ``trigram_input`` and with ``embedding_size == hidden_size`` it still builds
  ``embedding_transformation``: written as an identity;
* ``cls.predictions.bias``: the forward reads ``cls.predictions.decoder.bias``, and
  transformers ties ``cls.predictions.bias`` to it only when ``tie_word_embeddings`` (else it
  is an unused parameter): both are written, with the same values.

The last FFN of each block is ``intermediate``/``output`` in transformers and ``ffns.{F-1}``
here; the others are ``ffn.{j}`` and ``ffns.{j}``.

Not expressible in transformers (``is_mobilebert_compatible`` is False): neither attention flag
with ``hidden_size != intra_bottleneck_size`` (IB-BERT's shape: transformers projects the
H-wide block input with I-wide query/key/value layers and fails). Every other configuration of
the student is a ``MobileBertConfig`` with ``use_bottleneck=True``; conversely transformers'
``use_bottleneck=False`` (a plain post-LN encoder) is not a bottleneck student.
"""

from typing import Dict, Optional

import torch

_PREFIX = "mobilebert."
# ours stored transposed: the head's second decoder is a Linear here, a [H - E, vocab] matrix there
_TRANSPOSED = {"mlm_head.decoder_rest.weight"}


def _linear(ours: str, theirs: str) -> Dict[str, str]:
    return {f"{ours}.{p}": f"{theirs}.{p}" for p in ("weight", "bias")}


def _name_table(config: Dict) -> Dict[str, str]:
    """Every parameter name of a ``BottleneckEncoder`` with this config -> transformers' name."""
    emb = _PREFIX + "embeddings."
    table = {
        "embeddings.word_embeddings.weight": emb + "word_embeddings.weight",
        "embeddings.position_embeddings.weight": emb + "position_embeddings.weight",
        "embeddings.token_type_embeddings.weight": emb + "token_type_embeddings.weight",
        **_linear("embeddings.norm", emb + "LayerNorm"),
    }
    if _has_projection(config):
        table.update(_linear("embeddings.projection", emb + "embedding_transformation"))
    last = config["num_feedforward_networks"] - 1
    for i in range(config["num_layers"]):
        ours, theirs = f"blocks.{i}.", f"{_PREFIX}encoder.layer.{i}."
        pairs = {
            "narrow.linear": "bottleneck.input.dense",
            "narrow.norm": "bottleneck.input.LayerNorm",
            "attention.query": "attention.self.query",
            "attention.key": "attention.self.key",
            "attention.value": "attention.self.value",
            "attention.output": "attention.output.dense",
            "attention_norm": "attention.output.LayerNorm",
            "widen": "output.bottleneck.dense",
            "output_norm": "output.bottleneck.LayerNorm",
        }
        if _has_shared_query_key(config):
            pairs["narrow_query_key.linear"] = "bottleneck.attention.dense"
            pairs["narrow_query_key.norm"] = "bottleneck.attention.LayerNorm"
        for j in range(last + 1):
            ffn = "" if j == last else f"ffn.{j}."
            pairs[f"ffns.{j}.inner"] = ffn + "intermediate.dense"
            pairs[f"ffns.{j}.outer"] = ffn + "output.dense"
            pairs[f"ffns.{j}.norm"] = ffn + "output.LayerNorm"
        for a, b in pairs.items():
            table.update(_linear(ours + a, theirs + b))
    if config["mlm_head"]:
        table.update(
            {
                **_linear("mlm_head.dense", "cls.predictions.transform.dense"),
                **_linear("mlm_head.norm", "cls.predictions.transform.LayerNorm"),
                "mlm_head.decoder.weight": "cls.predictions.decoder.weight",
                "mlm_head.decoder.bias": "cls.predictions.decoder.bias",
                "mlm_head.decoder_rest.weight": "cls.predictions.dense.weight",  # transposed
            }
        )
    return table


def _has_projection(config: Dict) -> bool:
    return config["trigram_input"] or config["embedding_size"] != config["hidden_size"]


def _has_shared_query_key(config: Dict) -> bool:
    return config["key_query_shared_bottleneck"] and not config["use_bottleneck_attention"]


def _why_not_mobilebert(config: Dict) -> Optional[str]:
    if (
        not config["use_bottleneck_attention"]
        and not config["key_query_shared_bottleneck"]
        and config["hidden_size"] != config["intra_bottleneck_size"]
    ):
        return (
            "with neither use_bottleneck_attention nor key_query_shared_bottleneck, transformers' "
            "MobileBERT needs hidden_size == intra_bottleneck_size (its query/key/value layers take "
            f"intra_bottleneck_size inputs); got {config['hidden_size']} and "
            f"{config['intra_bottleneck_size']}"
        )
    return None


def is_mobilebert_compatible(config: Dict) -> bool:
    """Whether a ``BottleneckEncoder.config`` can be written as a transformers MobileBERT.

    False only for IB-BERT-shaped attention (neither attention flag, ``hidden_size !=
    intra_bottleneck_size``).
    """
    return _why_not_mobilebert(config) is None


def mobilebert_config_kwargs(config: Dict) -> Dict:
    """``MobileBertConfig`` arguments equivalent to a ``BottleneckEncoder.config``.

    ``architectures`` is ``MobileBertForMaskedLM``, or ``MobileBertModel`` for a student
    without an MLM head (whose pooler transformers then initialises afresh).
    """
    why = _why_not_mobilebert(config)
    if why:
        raise ValueError(f"Not expressible as a transformers MobileBERT: {why}")
    return dict(
        vocab_size=config["vocab_size"],
        embedding_size=config["embedding_size"],
        hidden_size=config["hidden_size"],
        intra_bottleneck_size=config["intra_bottleneck_size"],
        use_bottleneck=True,
        num_hidden_layers=config["num_layers"],
        num_attention_heads=config["num_heads"],
        intermediate_size=config["intermediate_size"],
        num_feedforward_networks=config["num_feedforward_networks"],
        use_bottleneck_attention=config["use_bottleneck_attention"],
        key_query_shared_bottleneck=config["key_query_shared_bottleneck"],
        trigram_input=config["trigram_input"],
        normalization_type=config["normalization"],
        hidden_act=config["activation"],
        hidden_dropout_prob=config["dropout"],
        attention_probs_dropout_prob=config["attention_dropout"],
        layer_norm_eps=config["layer_norm_eps"],
        max_position_embeddings=config["max_position_embeddings"],
        type_vocab_size=config["type_vocab_size"],
        pad_token_id=config["pad_token_id"],
        tie_word_embeddings=config["tie_word_embeddings"],
        architectures=["MobileBertForMaskedLM" if config["mlm_head"] else "MobileBertModel"],
    )


def bottleneck_kwargs_from_mobilebert(hf: Dict) -> Dict:
    """``BottleneckEncoder`` arguments for a MobileBERT ``config.json`` (``MobileBertConfig``
    defaults for missing keys). The MLM head is built unless ``architectures`` names only
    ``MobileBertModel``."""
    if not hf.get("use_bottleneck", True):
        raise ValueError("A MobileBERT with use_bottleneck=False is a plain post-LN encoder, not a bottleneck student")
    architectures = hf.get("architectures") or ["MobileBertForMaskedLM"]
    return dict(
        vocab_size=hf.get("vocab_size", 30522),
        embedding_size=hf.get("embedding_size", 128),
        hidden_size=hf.get("hidden_size", 512),
        intra_bottleneck_size=hf.get("intra_bottleneck_size", 128),
        num_layers=hf.get("num_hidden_layers", 24),
        num_heads=hf.get("num_attention_heads", 4),
        intermediate_size=hf.get("intermediate_size", 512),
        num_feedforward_networks=hf.get("num_feedforward_networks", 4),
        use_bottleneck_attention=hf.get("use_bottleneck_attention", False),
        key_query_shared_bottleneck=hf.get("key_query_shared_bottleneck", True),
        trigram_input=hf.get("trigram_input", True),
        normalization=hf.get("normalization_type", "no_norm"),
        activation=hf.get("hidden_act", "relu"),
        dropout=hf.get("hidden_dropout_prob", 0.0),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        pad_token_id=hf.get("pad_token_id", 0),
        mlm_head=architectures != ["MobileBertModel"],
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


def native_to_mobilebert(state: Dict[str, torch.Tensor], config: Dict) -> Dict[str, torch.Tensor]:
    """Our state dict -> ``MobileBertForMaskedLM``'s (a tied decoder weight is left to
    transformers' tying; parameters it builds but never uses are filled in)."""
    why = _why_not_mobilebert(config)
    if why:
        raise ValueError(f"Not expressible as a transformers MobileBERT: {why}")
    table = _name_table(config)
    unknown = sorted(set(state) - set(table))
    if unknown:
        raise KeyError(f"Not parameters of a BottleneckEncoder with this config: {unknown[:5]}")
    out = {table[k]: (v.t() if k in _TRANSPOSED else v).contiguous() for k, v in state.items()}
    h, i = config["hidden_size"], config["intra_bottleneck_size"]
    like = state["embeddings.word_embeddings.weight"]
    if not _has_projection(config):  # built, never used: write an identity
        out[_PREFIX + "embeddings.embedding_transformation.weight"] = torch.eye(h, dtype=like.dtype)
        out[_PREFIX + "embeddings.embedding_transformation.bias"] = like.new_zeros(h)
    if config["use_bottleneck_attention"] and config["key_query_shared_bottleneck"]:
        for b in range(config["num_layers"]):  # built, never used
            name = f"{_PREFIX}encoder.layer.{b}.bottleneck.attention."
            out[name + "dense.weight"] = like.new_zeros(i, h)
            out[name + "dense.bias"] = like.new_zeros(i)
            out[name + "LayerNorm.weight"] = like.new_ones(i)
            out[name + "LayerNorm.bias"] = like.new_zeros(i)
    if config["mlm_head"]:
        # The forward reads decoder.bias; transformers ties predictions.bias to it only when
        # the word embeddings are tied (otherwise it is unused). Writing both keeps it quiet.
        out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"].clone()
        if config["tie_word_embeddings"]:
            out.pop("cls.predictions.decoder.weight", None)
    return out


def mobilebert_to_native(state: Dict[str, torch.Tensor], config: Dict) -> Dict[str, torch.Tensor]:
    """A MobileBERT state dict (``MobileBertForMaskedLM``/``ForPreTraining``, or a bare
    ``MobileBertModel`` without the ``mobilebert.`` prefix) -> ours. Fills a tied decoder from
    the word embeddings; drops what the student does not have (pooler, NSP head, the unused
    parameters listed in the module docstring)."""
    if not any(k.startswith(_PREFIX) for k in state):
        state = {(k if k.startswith("cls.") else _PREFIX + k): v for k, v in state.items()}
    to_native = {v: k for k, v in _name_table(config).items()}
    out = {to_native[k]: v for k, v in state.items() if k in to_native}
    out = {k: (v.t().contiguous() if k in _TRANSPOSED else v) for k, v in out.items()}
    if config["mlm_head"]:
        if "mlm_head.decoder.weight" not in out:
            out["mlm_head.decoder.weight"] = out["embeddings.word_embeddings.weight"]
        if "mlm_head.decoder.bias" not in out and "cls.predictions.bias" in state:
            out["mlm_head.decoder.bias"] = state["cls.predictions.bias"]
    return out
