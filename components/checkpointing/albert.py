"""Weight names between an adapter-free ``RecursiveEncoder`` and transformers' ALBERT.

An adapter-free recursive student *is* ``AlbertForMaskedLM`` with one hidden group and one
inner layer, so conversion is a renaming (plus an identity projector when E == H).

A student without an MLM head is an ``AlbertModel``, which always has a pooler (a Linear and a
tanh on the [CLS] hidden state) the student never had. It is written as an identity Linear, so
``pooler_output`` is ``tanh`` of the student's [CLS] state and transformers initialises nothing
at random on load (no "newly initialized" report); reading the folder back drops it.
"""

from typing import Dict

import torch

_LAYER = "albert.encoder.albert_layer_groups.0.albert_layers.0."

# ours -> ALBERT's
NATIVE_TO_ALBERT = {
    "embeddings.word_embeddings.weight": "albert.embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "albert.embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "albert.embeddings.token_type_embeddings.weight",
    "embeddings.norm.weight": "albert.embeddings.LayerNorm.weight",
    "embeddings.norm.bias": "albert.embeddings.LayerNorm.bias",
    "projector.weight": "albert.encoder.embedding_hidden_mapping_in.weight",
    "projector.bias": "albert.encoder.embedding_hidden_mapping_in.bias",
    "layer.attention.query.weight": _LAYER + "attention.query.weight",
    "layer.attention.query.bias": _LAYER + "attention.query.bias",
    "layer.attention.key.weight": _LAYER + "attention.key.weight",
    "layer.attention.key.bias": _LAYER + "attention.key.bias",
    "layer.attention.value.weight": _LAYER + "attention.value.weight",
    "layer.attention.value.bias": _LAYER + "attention.value.bias",
    "layer.attention.output.weight": _LAYER + "attention.dense.weight",
    "layer.attention.output.bias": _LAYER + "attention.dense.bias",
    "layer.attention_norm.weight": _LAYER + "attention.LayerNorm.weight",
    "layer.attention_norm.bias": _LAYER + "attention.LayerNorm.bias",
    "layer.ffn_in.weight": _LAYER + "ffn.weight",
    "layer.ffn_in.bias": _LAYER + "ffn.bias",
    "layer.ffn_out.weight": _LAYER + "ffn_output.weight",
    "layer.ffn_out.bias": _LAYER + "ffn_output.bias",
    "layer.ffn_norm.weight": _LAYER + "full_layer_layer_norm.weight",
    "layer.ffn_norm.bias": _LAYER + "full_layer_layer_norm.bias",
    "mlm_head.dense.weight": "predictions.dense.weight",
    "mlm_head.dense.bias": "predictions.dense.bias",
    "mlm_head.norm.weight": "predictions.LayerNorm.weight",
    "mlm_head.norm.bias": "predictions.LayerNorm.bias",
    "mlm_head.decoder.weight": "predictions.decoder.weight",
    "mlm_head.decoder.bias": "predictions.bias",
}
ALBERT_TO_NATIVE = {v: k for k, v in NATIVE_TO_ALBERT.items()}


def albert_config_kwargs(config: Dict) -> Dict:
    """``AlbertConfig`` arguments equivalent to a ``RecursiveEncoder.config``."""
    return dict(
        vocab_size=config["vocab_size"],
        embedding_size=config["embedding_size"],
        hidden_size=config["hidden_size"],
        num_hidden_layers=config["num_iterations"],
        num_hidden_groups=1,
        inner_group_num=1,
        num_attention_heads=config["num_heads"],
        intermediate_size=config["intermediate_size"],
        hidden_act=config["activation"],
        hidden_dropout_prob=config["dropout"],
        attention_probs_dropout_prob=config["attention_dropout"],
        max_position_embeddings=config["max_position_embeddings"],
        type_vocab_size=config["type_vocab_size"],
        layer_norm_eps=config["layer_norm_eps"],
        pad_token_id=config["pad_token_id"],
        tie_word_embeddings=config["tie_word_embeddings"],
        # a student without an MLM head (hidden-state distillation) is an AlbertModel
        architectures=["AlbertForMaskedLM" if config["mlm_head"] else "AlbertModel"],
    )


def recursive_kwargs_from_albert(hf: Dict) -> Dict:
    """``RecursiveEncoder`` arguments for an ALBERT ``config.json`` (one shared layer only)."""
    if hf.get("num_hidden_groups", 1) != 1 or hf.get("inner_group_num", 1) != 1:
        raise ValueError(
            "Only ALBERT models with num_hidden_groups=1 and inner_group_num=1 are recursive "
            f"students; got {hf.get('num_hidden_groups')} and {hf.get('inner_group_num')}"
        )
    return dict(
        vocab_size=hf["vocab_size"],
        embedding_size=hf["embedding_size"],
        hidden_size=hf["hidden_size"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        num_iterations=hf["num_hidden_layers"],
        adapter_placement=None,
        mlm_head=(hf.get("architectures") or ["AlbertForMaskedLM"])[0] != "AlbertModel",
        mlm_head_size=hf["embedding_size"],
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        activation=hf.get("hidden_act", "gelu_new"),
        dropout=hf.get("hidden_dropout_prob", 0.0),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        pad_token_id=hf.get("pad_token_id", 0),
    )


def native_to_albert(state: Dict[str, torch.Tensor], config: Dict) -> Dict[str, torch.Tensor]:
    """Our state dict -> ALBERT's (the tied decoder weight is left to ALBERT's tying; a headless
    student gains an identity pooler)."""
    state = dict(state)
    if "projector.weight" not in state:  # E == H: ALBERT still has the Linear, as an identity
        h = config["hidden_size"]
        state["projector.weight"] = torch.eye(h)
        state["projector.bias"] = torch.zeros(h)
    out = {NATIVE_TO_ALBERT[k]: v.contiguous() for k, v in state.items()}
    if config["mlm_head"]:
        # ALBERT ties decoder.bias to predictions.bias; writing both keeps its loader quiet.
        out["predictions.decoder.bias"] = out["predictions.bias"].clone()
        if config["tie_word_embeddings"]:
            out.pop("predictions.decoder.weight", None)
    else:  # AlbertModel's pooler, as an identity (see the module docstring)
        h, dtype = config["hidden_size"], out["albert.embeddings.word_embeddings.weight"].dtype
        out["albert.pooler.weight"] = torch.eye(h, dtype=dtype)
        out["albert.pooler.bias"] = torch.zeros(h, dtype=dtype)
    return out


def albert_to_native(state: Dict[str, torch.Tensor], config: Dict) -> Dict[str, torch.Tensor]:
    """ALBERT's state dict -> ours (fills a tied decoder from the word embeddings)."""
    if not any(k.startswith("albert.") for k in state):  # an AlbertModel saved by transformers
        state = {("albert." + k if not k.startswith("predictions.") else k): v for k, v in state.items()}
    out = {ALBERT_TO_NATIVE[k]: v for k, v in state.items() if k in ALBERT_TO_NATIVE}
    if not config["mlm_head"]:
        return out
    if "mlm_head.decoder.weight" not in out:
        out["mlm_head.decoder.weight"] = out["embeddings.word_embeddings.weight"]
    if "mlm_head.decoder.bias" not in out and "predictions.decoder.bias" in state:
        out["mlm_head.decoder.bias"] = state["predictions.decoder.bias"]
    return out
