"""The bottleneck student against transformers' MobileBERT (the oracle)."""

import logging

import pytest
import torch
from safetensors.torch import save_file
from transformers import MobileBertConfig, MobileBertForMaskedLM, MobileBertModel
from transformers.utils import logging as hf_logging

import components.models.bottleneck as bottleneck_module
from components.checkpointing.mobilebert import (
    bottleneck_kwargs_from_mobilebert,
    is_mobilebert_compatible,
    mobilebert_config_kwargs,
    mobilebert_to_native,
    native_to_mobilebert,
)
from components.models.bottleneck import (
    bottleneck_tiny,
    BottleneckEncoder,
    mobilebert,
    mobilebert_tiny,
    NoNorm,
)

TOL = 1e-5

MOBILEBERT_FLAGS = dict(num_feedforward_networks=4)  # bottleneck_tiny has MobileBERT's flags
TINY_FLAGS = dict(num_feedforward_networks=2, use_bottleneck_attention=True, key_query_shared_bottleneck=False)
CASES = {
    # a large eps makes a LayerNorm built with the wrong eps visible
    "mobilebert-no_norm": dict(MOBILEBERT_FLAGS),
    "mobilebert-layer_norm": dict(MOBILEBERT_FLAGS, normalization="layer_norm", layer_norm_eps=1e-3),
    "tiny-no_norm": dict(TINY_FLAGS),
    "tiny-layer_norm": dict(TINY_FLAGS, normalization="layer_norm", layer_norm_eps=1e-3),
    # both flags (transformers builds an unused q/k bottleneck), no trigram, untied decoder
    "both-flags-untied": dict(
        use_bottleneck_attention=True, trigram_input=False, tie_word_embeddings=False, activation="gelu"
    ),
    # neither flag (needs H == I in transformers), E == H without trigram: unused projection
    "plain-attention": dict(
        embedding_size=32,
        hidden_size=32,
        key_query_shared_bottleneck=False,
        trigram_input=False,
        normalization="layer_norm",
        layer_norm_eps=1e-3,
    ),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread beats two waiting on each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(vocab=1000, pad_id=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = pad_id
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    return ids, mask, types


def perturb(module, std=0.1, seed=1):
    """Move every parameter away from its initial value (norms off 1/0, biases off 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def hf_model(config):
    hf_config = MobileBertConfig(**mobilebert_config_kwargs(config), attn_implementation="eager")
    return MobileBertForMaskedLM(hf_config).eval()


def run_hf(hf, ids, mask, types):
    return hf(
        input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True, output_attentions=True
    )


def assert_same_outputs(ours, theirs, mask, num_layers):
    valid = mask.bool()
    assert len(ours.hidden_states) == len(theirs.hidden_states) == num_layers + 1
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        assert a.shape == b.shape
        assert (a - b)[valid].abs().max() <= TOL
    assert sorted(ours.attentions) == list(range(1, num_layers + 1))
    for i in range(1, num_layers + 1):
        assert (ours.attentions[i] - theirs.attentions[i - 1]).abs().max() <= TOL
    assert ours.logits.shape == theirs.logits.shape
    assert (ours.logits - theirs.logits)[valid].abs().max() <= TOL


# transformers' own empty [0, vocab] decoder when E == H
IGNORE_EMPTY_INIT = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


@IGNORE_EMPTY_INIT
@pytest.mark.parametrize("case", list(CASES))
def test_mobilebert_weights_reproduce_transformers(case):
    torch.manual_seed(0)
    config = bottleneck_tiny(**CASES[case]).config
    hf = perturb(hf_model(config))
    student = BottleneckEncoder(**config)
    student.load_state_dict(mobilebert_to_native(hf.state_dict(), config), strict=True)
    student.eval()
    ids, mask, types = batch()
    num_layers = config["num_layers"]
    ours = student(ids, mask, types, attention_layers=range(1, num_layers + 1))
    with torch.no_grad():
        theirs = run_hf(hf, ids, mask, types)
    assert_same_outputs(ours, theirs, mask, num_layers)
    # token types and the trigram matter: other inputs give other outputs
    assert not torch.allclose(student(ids, mask).logits, ours.logits, atol=1e-3)


@IGNORE_EMPTY_INIT
@pytest.mark.parametrize("case", list(CASES))
def test_student_weights_load_into_transformers(case):
    torch.manual_seed(0)
    student = perturb(bottleneck_tiny(**CASES[case])).eval()
    config = student.config
    hf = hf_model(config)
    missing, unexpected = hf.load_state_dict(native_to_mobilebert(student.state_dict(), config), strict=False)
    assert unexpected == []
    assert missing == (["cls.predictions.decoder.weight"] if config["tie_word_embeddings"] else [])
    hf.tie_weights()
    ids, mask, types = batch()
    ours = student(ids, mask, types, attention_layers=range(1, config["num_layers"] + 1))
    with torch.no_grad():
        theirs = run_hf(hf, ids, mask, types)
    assert_same_outputs(ours, theirs, mask, config["num_layers"])
    # and back: the same state dict as we started from
    back = mobilebert_to_native(native_to_mobilebert(student.state_dict(), config), config)
    assert back.keys() == student.state_dict().keys()
    assert all(torch.equal(v, back[k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize("case", ["mobilebert-no_norm", "tiny-layer_norm", "both-flags-untied"])
def test_folder_round_trip_through_from_pretrained(tmp_path, caplog, case):
    torch.manual_seed(0)
    student = perturb(bottleneck_tiny(**CASES[case])).eval()
    MobileBertConfig(**mobilebert_config_kwargs(student.config)).save_pretrained(tmp_path)
    save_file(
        native_to_mobilebert(student.state_dict(), student.config),
        str(tmp_path / "model.safetensors"),
        {"format": "pt"},
    )
    hf_logging.enable_propagation()  # transformers' logger does not reach caplog otherwise
    try:
        with caplog.at_level(logging.INFO, logger="transformers"):
            hf, info = MobileBertForMaskedLM.from_pretrained(
                str(tmp_path), attn_implementation="eager", output_loading_info=True
            )
    finally:
        hf_logging.disable_propagation()
    hf.eval()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert all(not v for v in info.values()), info
    ids, mask, types = batch()
    ours = student(ids, mask, types)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert (ours.logits - theirs.logits)[mask.bool()].abs().max() <= TOL
    # the folder's config.json reads back as the same student
    assert BottleneckEncoder(**bottleneck_kwargs_from_mobilebert(hf.config.to_dict())).config == student.config


def count(model, with_head=False):
    return sum(p.numel() for n, p in model.named_parameters() if with_head or not n.startswith("mlm_head"))


@pytest.mark.parametrize(
    "builder, body, with_head",
    [(mobilebert, 24_581_888, 36_596_538), (mobilebert_tiny, 15_485_696, 27_500_346)],
)
def test_parameter_counts(builder, body, with_head):
    with torch.device("meta"):
        student = builder()
        hf_config = MobileBertConfig(**mobilebert_config_kwargs(student.config))
        hf_body = MobileBertModel(hf_config, add_pooling_layer=False)
        hf_full = MobileBertForMaskedLM(hf_config)
    assert count(student) == body  # counted by hand: embeddings + 24 blocks (the builders' docstrings)
    assert count(student) == sum(p.numel() for p in hf_body.parameters())
    assert count(student, with_head=True) == with_head == sum(p.numel() for p in hf_full.parameters())
    assert count(student.embeddings) == 4_368_128


def test_config_rebuilds_and_maps_both_ways():
    for case in CASES.values():
        student = bottleneck_tiny(**case)
        assert BottleneckEncoder(**student.config).config == student.config
        hf_dict = MobileBertConfig(**mobilebert_config_kwargs(student.config)).to_dict()
        assert bottleneck_kwargs_from_mobilebert(hf_dict) == student.config
    headless = bottleneck_tiny(mlm_head=False)
    assert mobilebert_config_kwargs(headless.config)["architectures"] == ["MobileBertModel"]
    assert bottleneck_kwargs_from_mobilebert(mobilebert_config_kwargs(headless.config))["mlm_head"] is False
    assert headless.spec.has_mlm_head is False and headless(*batch()[:2]).logits is None
    with pytest.raises(ValueError, match="use_bottleneck=False"):
        bottleneck_kwargs_from_mobilebert({"use_bottleneck": False})


def test_ib_bert_attention_is_ours_only():
    # neither flag with H != I: we project q/k/v from the H-wide input; transformers cannot
    config = bottleneck_tiny(key_query_shared_bottleneck=False).config
    assert not is_mobilebert_compatible(config)
    assert is_mobilebert_compatible(bottleneck_tiny().config)
    with pytest.raises(ValueError, match="hidden_size == intra_bottleneck_size"):
        mobilebert_config_kwargs(config)
    ids, mask, _ = batch()
    assert BottleneckEncoder(**config)(ids, mask).logits.shape == (3, 12, 1000)
    hf_config = MobileBertConfig(
        **{**mobilebert_config_kwargs(bottleneck_tiny().config), "key_query_shared_bottleneck": False}
    )
    with pytest.raises(RuntimeError):
        MobileBertForMaskedLM(hf_config)(input_ids=ids)


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="Unknown normalization 'batch_norm'"):
        bottleneck_tiny(normalization="batch_norm")
    with pytest.raises(ValueError, match="not divisible by num_heads 5"):
        bottleneck_tiny(num_heads=5)
    with pytest.raises(ValueError, match="Unknown activation 'swish2'"):
        bottleneck_tiny(activation="swish2")
    with pytest.raises(ValueError, match="embedding_size <= hidden_size"):
        bottleneck_tiny(embedding_size=128)
    with pytest.raises(ValueError, match="num_feedforward_networks must be at least 1"):
        bottleneck_tiny(num_feedforward_networks=0)
    bottleneck_tiny(embedding_size=128, mlm_head=False)  # no head, no constraint
    with pytest.raises(ValueError, match="exceeds the 128 position embeddings"):
        bottleneck_tiny()(torch.ones(1, 129, dtype=torch.long))


def test_initialisation_and_spec():
    torch.manual_seed(0)
    student = bottleneck_tiny()
    norms = [m for m in student.modules() if isinstance(m, NoNorm)]
    assert len(norms) == 1 + 4 * (1 + 1 + 1 + 2 + 1)  # embeddings; narrow, q/k, attention, 2 FFNs, output
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in norms)
    assert student.mlm_head.decoder.weight is student.embeddings.word_embeddings.weight
    assert 0.01 < student.mlm_head.decoder_rest.weight.std() < 0.03
    untied = bottleneck_tiny(tie_word_embeddings=False)
    assert untied.mlm_head.decoder.weight is not untied.embeddings.word_embeddings.weight
    assert student.spec.num_layers == 4 and student.spec.hidden_size == 64 and student.spec.num_heads == 4
    assert student.spec.vocab_size == 1000 and student.spec.has_mlm_head
    assert student.max_sequence_length == 128 and student.adapter_parameters() == []


def test_attention_layers_and_logits_mask():
    torch.manual_seed(0)
    student = perturb(bottleneck_tiny()).eval()
    ids, mask, types = batch()
    fast = student(ids, mask, types)
    explicit = student(ids, mask, types, attention_layers={1, 3})
    assert fast.attentions == {} and set(explicit.attentions) == {1, 3}
    assert explicit.attentions[1].shape == (3, 4, 12, 12)
    for a, b in zip(fast.hidden_states, explicit.hidden_states):
        assert (a - b)[mask.bool()].abs().max() <= TOL
    probs = explicit.attentions[3]
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)
    assert probs[1, :, :, 8:].abs().max() == 0  # padded keys get no attention
    assert all(h.shape == (3, 12, 64) for h in fast.hidden_states) and len(fast.hidden_states) == 5
    where = torch.zeros_like(mask, dtype=torch.bool)
    where[0, 3] = where[2, 1] = True
    out = student(ids, mask, types, logits_mask=where)
    assert out.logits.shape == (2, 1000)
    assert torch.allclose(out.logits, fast.logits[where], atol=1e-6)
    assert student(ids, mask, return_logits=False).logits is None


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch):
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(bottleneck_module, "checkpoint", counting_checkpoint)
    torch.manual_seed(0)
    student = perturb(bottleneck_tiny(attention_dropout=0.0)).train()
    ids, mask, types = batch()

    def grads(checkpointing):
        student.zero_grad()
        student.activation_checkpointing = checkpointing
        out = student(ids, mask, types, attention_layers={2})
        (out.logits.square().mean() + out.hidden_states[2].mean() + out.attentions[2].mean()).backward()
        return {n: p.grad.clone() for n, p in student.named_parameters()}

    plain = grads(False)
    assert calls == []
    checkpointed = grads(True)
    assert calls == [False] * 4
    assert plain.keys() == checkpointed.keys()
    assert all(plain[n].abs().max() > 0 for n in plain)
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], atol=1e-6, rtol=1e-5), n
