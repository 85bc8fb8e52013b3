"""Our distillation step against the plain transformers loop (components/testing/reference_loop.py), the one
benchmarks/run.py times ours against: the same weights and windows must give the same loss
terms and the same student gradients, for MiniALBERT's loss (teacher with an MLM head) and for
the hidden + attention loss of a teacher without one, with packed rows on our side."""

import math
from pathlib import Path

import pytest
import torch
from transformers import AlbertConfig, AlbertForMaskedLM, BertConfig, BertForMaskedLM, BertModel

from components.checkpointing.albert import NATIVE_TO_ALBERT
from components.checkpointing.hf_bert import load_hf_encoder
from components.checkpointing.student import load_student
from components.losses import DistillationLoss
from components.models.teacher import FrozenTeacher
from components.testing.reference_loop import LAYERS, MINIALBERT, ReferenceLoop
from components.training.distill import distill_forward, MaskedBatch, pack_batch

VOCAB, PAD, MASK = 300, 0, 4


def make_models(folder, heads: bool):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    teacher = BertForMaskedLM(config) if heads else BertModel(config, add_pooling_layer=False)
    with torch.no_grad():  # attention as sharp as a trained model's, so the KL term matters
        for name, p in teacher.named_parameters():
            if name.endswith(("attention.self.query.weight", "attention.self.key.weight")):
                p.mul_(6.0)
    teacher.save_pretrained(str(folder / "teacher"))
    student = AlbertForMaskedLM(
        AlbertConfig(
            vocab_size=VOCAB,
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            hidden_act="gelu_new",
            tie_word_embeddings=False,
        )
    )
    if not heads:
        student.config.architectures = ["AlbertModel"]
        student.albert.save_pretrained(str(folder / "student"))
    else:
        student.save_pretrained(str(folder / "student"))
    return str(folder / "teacher"), str(folder / "student")


def windows(masked: bool) -> MaskedBatch:
    g = torch.Generator().manual_seed(1)
    lengths = [20, 7, 13, 5, 16, 9]
    ids = torch.full((len(lengths), 24), PAD)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
        if masked:
            labels[i, 1:n:4] = ids[i, 1:n:4]
            ids[i, 1:n:4] = MASK
    return MaskedBatch(ids, mask, labels)


@pytest.mark.parametrize("kind", [MINIALBERT, LAYERS])
def test_our_step_computes_the_reference_loss_and_gradients(tmp_path, kind):
    heads = kind == MINIALBERT
    teacher_dir, student_dir = make_models(tmp_path, heads)
    batch = windows(masked=heads)
    reference = ReferenceLoop(teacher_dir, student_dir, batch, kind)

    encoder, _ = load_hf_encoder(Path(teacher_dir))
    teacher, student = FrozenTeacher(encoder), load_student(student_dir).train()
    assert (student.mlm_head is not None) == heads
    weights = (
        {"mlm": 1.0, "output": 5.0, "hidden": 3.0, "attention": 3.0} if heads else {"hidden": 3.0, "attention": 3.0}
    )
    loss_fn = DistillationLoss(
        student.spec, teacher.spec, weights=weights, attention_reduction="element" if heads else "distribution"
    )
    ours = distill_forward(student, teacher, loss_fn, batch if heads else pack_batch(batch, PAD))
    theirs = reference.loss()
    assert set(theirs) == {"total", *ours.terms}
    assert float(ours.total) == pytest.approx(float(theirs["total"]), rel=1e-5)
    for term, value in ours.terms.items():
        assert float(value) == pytest.approx(float(theirs[term]), rel=1e-5), term
    assert float(ours.terms["attention"]) > 1e-3  # the term is not trivially 0

    ours.total.backward()
    theirs["total"].backward()
    ref_params = dict(reference.student.named_parameters(remove_duplicate=False))
    prefix = "" if heads else "albert."  # AlbertModel's names lack the prefix
    # transformers leaves ALBERT's predictions.bias and predictions.decoder.bias as two
    # parameters when the decoder is untied; only decoder.bias is used by the forward.
    aliases = {"predictions.bias": "predictions.decoder.bias"}
    diffs, norms = {}, {}
    for name, p in student.named_parameters():
        ref_name = NATIVE_TO_ALBERT[name]
        q = ref_params.get(ref_name) if heads else ref_params.get(ref_name[len(prefix) :])
        if q.grad is None and ref_name in aliases:
            q = ref_params[aliases[ref_name]]
        assert p.grad is not None and q.grad is not None, name
        diffs[name] = (p.grad - q.grad).double().norm().item()
        norms[name] = q.grad.double().norm().item()
    total = math.sqrt(sum(n * n for n in norms.values()))
    assert math.sqrt(sum(d * d for d in diffs.values())) <= 1e-4 * total
    for name in diffs:  # tensor by tensor, relative to itself unless its gradient is ~0 (key bias)
        assert diffs[name] <= 1e-3 * max(norms[name], 1e-3 * total), name
