"""data.pack: several windows per row with block-diagonal attention must give every token, and
every loss term, exactly what the padded batch gives."""

import pytest
import torch

from components.losses import DistillationLoss
from components.models import BertEncoder
from components.models.bottleneck import bottleneck_tiny
from components.models.layers import segment_positions
from components.models.recursive import recursive_tiny
from components.models.teacher import FrozenTeacher
from components.training.distill import distill_forward, MaskedBatch, pack_batch

PAD = 0
LENGTHS = [5, 16, 3, 9, 12, 2, 7, 16]


def padded_batch(lengths=LENGTHS, width=16, mask_every=0, seed=0) -> MaskedBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, 1000, (n,), generator=g)
        mask[i, :n] = 1
        if mask_every:
            labels[i, :n:mask_every] = ids[i, :n:mask_every]
            ids[i, :n:mask_every] = 4  # [MASK]
    return MaskedBatch(ids, mask, labels)


def unpack(packed: torch.Tensor, batch: MaskedBatch, packed_batch: MaskedBatch) -> torch.Tensor:
    """Per-token values of a packed ``[rows, seq, ...]`` tensor, back in the padded layout's
    token order (padding dropped)."""
    pieces = {}
    for r in range(packed_batch.input_ids.shape[0]):
        for k in packed_batch.segment_ids[r].unique().tolist():
            if k:
                pieces.setdefault(r, []).append(packed[r][packed_batch.segment_ids[r] == k])
    # pack_batch places sequences longest first (ties in batch order); map them back
    lengths = batch.attention_mask.sum(1).tolist()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    flat = [p for r in sorted(pieces) for p in pieces[r]]
    by_length = {}
    for piece in flat:
        by_length.setdefault(piece.shape[0], []).append(piece)
    out = [None] * len(lengths)
    for i in order:
        out[i] = by_length[lengths[i]].pop(0)
    return torch.cat(out)


def test_pack_batch_keeps_every_token_in_fewer_rows():
    batch = padded_batch(mask_every=3)
    packed = pack_batch(batch, PAD)
    assert packed.input_ids.shape == (5, 16)  # 70 tokens: 16 | 16 | 12+3 | 9+7 | 5+2 (first fit, longest first)
    assert int(packed.attention_mask.sum()) == int(batch.attention_mask.sum()) == sum(LENGTHS)
    assert packed.segment_ids.max() == 2
    assert torch.equal(packed.attention_mask.bool(), packed.segment_ids > 0)
    assert torch.equal(
        packed.input_ids[packed.attention_mask == 0], torch.full(((packed.attention_mask == 0).sum(),), PAD)
    )

    # the same multiset of (token, label) pairs, and the same masked positions' count
    def pairs(b):
        return sorted(zip(b.input_ids[b.attention_mask.bool()].tolist(), b.labels[b.attention_mask.bool()].tolist()))

    assert pairs(packed) == pairs(batch)
    assert int(packed.masked_positions.sum()) == int(batch.masked_positions.sum())
    # deterministic
    again = pack_batch(batch, PAD)
    assert all(torch.equal(a, b) for a, b in zip(packed.tensors(), again.tensors()))


def test_segment_positions_restart_with_each_sequence():
    segments = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def encoders():
    torch.manual_seed(0)
    teacher = BertEncoder(
        vocab_size=1000,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        dropout=0.0,
        attention_dropout=0.0,
        max_position_embeddings=32,
    )
    for layer in teacher.layers:  # sharper attention than an untrained model's
        layer.attention.query.weight.data.mul_(8)
        layer.attention.key.weight.data.mul_(8)
    return {
        "bert": teacher,
        "recursive with adapters": recursive_tiny(dropout=0.0, attention_dropout=0.0),
        "bottleneck": bottleneck_tiny(trigram_input=False, dropout=0.0, attention_dropout=0.0),
    }


@pytest.mark.parametrize("name", ["bert", "recursive with adapters", "bottleneck"])
def test_packed_rows_encode_each_sequence_as_alone(name):
    model = encoders()[name].eval()
    batch = padded_batch()
    packed = pack_batch(batch, PAD)
    layers = set(range(1, model.spec.num_layers + 1))
    with torch.no_grad():
        alone = model(batch.input_ids, batch.attention_mask, attention_layers=layers, return_logits=False)
        together = model(
            packed.input_ids,
            packed.attention_mask,
            attention_layers=layers,
            return_logits=False,
            segment_ids=packed.segment_ids,
        )
    tokens = batch.attention_mask.bool()
    for a, b in zip(alone.hidden_states, together.hidden_states):
        torch.testing.assert_close(unpack(b, batch, packed), a[tokens], atol=2e-5, rtol=1e-5)
    for layer in layers:
        # each query's probabilities over its own sequence's keys; nothing outside it
        p = together.attentions[layer]
        same = packed.segment_ids[:, :, None] == packed.segment_ids[:, None, :]
        outside = p.masked_fill(same[:, None], 0.0)[packed.attention_mask.bool()[:, None, :, None].expand_as(p)]
        assert float(outside.abs().max()) == 0.0
        assert (
            float(p.sum(-1)[packed.attention_mask.bool()[:, None].expand(-1, p.shape[1], -1)].sub(1).abs().max()) < 1e-5
        )


def test_trigram_students_refuse_packed_rows():
    model = bottleneck_tiny()
    packed = pack_batch(padded_batch(), PAD)
    with pytest.raises(ValueError, match="trigram-input student cannot read packed rows"):
        model(packed.input_ids, packed.attention_mask, segment_ids=packed.segment_ids)


@pytest.mark.parametrize("student_name", ["recursive with adapters", "bottleneck"])
def test_distillation_loss_is_the_same_packed(student_name):
    models = encoders()
    teacher, student = FrozenTeacher(models["bert"]), models[student_name].train()
    weights = {
        "mlm": 1.0,
        "output": 5.0,
        "hidden": 3.0,
        "attention": 3.0,
        "embedding": 1.0,
        "sentence": 2.0,
        "feature_map": 1.0,
    }
    loss_fn = DistillationLoss(student.spec, teacher.spec, weights=weights, layer_weights={1: 2.0})
    batch = padded_batch(mask_every=4)
    packed = pack_batch(batch, PAD)
    results = []
    for b in (batch, packed):
        student.zero_grad(set_to_none=True)
        out = distill_forward(student, teacher, loss_fn, b)
        out.total.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    assert set(a.terms) == set(b.terms) and len(a.terms) >= 5 and "sentence" in a.terms
    for term in a.terms:
        torch.testing.assert_close(b.terms[term], a.terms[term], rtol=2e-5, atol=1e-6)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-3, atol=1e-6, msg=name)


def test_recipe_with_packing_logs_the_losses_of_padded_rows(tmp_path, teacher_dir, documents):
    from tests.recipe_helpers import logged, run_recipe, tiny_config

    # one short sentence per line: windows of uneven length, so that rows really pack (dropout
    # off: its random masks would differ between the two layouts)
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(s.strip() for d in documents for s in d.split(". ") if 3 < len(s.split()) < 20))
    losses = {}
    for pack in (False, True):
        out = tmp_path / f"pack_{pack}"
        recipe = run_recipe(
            tiny_config(
                out,
                teacher_dir,
                sentences,
                **{
                    "data.pack": pack,
                    "data.sample_by": "line",
                    "max_steps": 2,
                    "save_every_n_steps": None,
                    "student.dropout": 0.0,
                    "student.attention_dropout": 0.0,
                },
            )
        )
        rows = recipe.step_batches(step=0)[0].input_ids.shape[0]
        assert rows < 8 if pack else rows == 8
        losses[pack] = {step: r["loss/total"] for step, r in logged(out).items() if "loss/total" in r}
    assert losses[True].keys() == losses[False].keys() == {1, 2}
    for step in (1, 2):
        assert losses[True][step] == pytest.approx(losses[False][step], rel=1e-4)


def test_recipe_refuses_packing_with_element_attention_reduction(tmp_path, teacher_dir, corpus_file):
    from components.errors import ConfigError
    from tests.recipe_helpers import run_recipe, tiny_config

    cfg = tiny_config(
        tmp_path / "run", teacher_dir, corpus_file, **{"data.pack": True, "loss.attention_reduction": "element"}
    )
    with pytest.raises(ConfigError, match="data.pack=true with loss.attention_reduction=element"):
        run_recipe(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_embedding_teacher_config_runs_on_a_headless_teacher(tmp_path, tokenizer, documents):
    """configs/embedding_teacher.yaml as shipped, shrunk: a teacher without an MLM head, a student
    without one, no masking, packed rows; the student comes out as a transformers AlbertModel."""
    from omegaconf import OmegaConf
    from transformers import AlbertModel

    from tests.helpers import make_hf_teacher, REPO
    from tests.recipe_helpers import logged, override, run_recipe

    teacher = make_hf_teacher(tmp_path / "teacher", tokenizer, kind="bert-no-head")
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(s.strip() for d in documents for s in d.split(". ") if 3 < len(s.split()) < 20))
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "embedding_teacher.yaml"))
    cfg = override(
        cfg,
        {
            "output_dir": str(tmp_path / "run"),
            "teacher.path": str(teacher),
            "data.source": str(sentences),
            "data.hub_config": None,
            "data.max_length": 32,
            "data.stride": 24,
            "data.batch_size": 8,
            "data.eval_fraction": 0.1,
            "student.hidden_size": 32,
            "student.embedding_size": 16,
            "student.num_heads": 4,
            "student.intermediate_size": 64,
            "student.num_iterations": 2,
            "max_steps": 3,
            "eval_every_n_steps": None,
            "save_every_n_steps": None,
            "log_every_n_steps": 1,
        },
    )
    recipe = run_recipe(cfg)
    assert recipe.step_batches(step=0)[0].segment_ids is not None  # packed
    records = logged(tmp_path / "run")
    assert set(records[3]) >= {
        "loss/hidden",
        "loss/attention",
        "eval/alignment_cosine/student_2_teacher_4",
        "eval/sentence_cosine",
    }
    assert -1.0 <= records[3]["eval/sentence_cosine"] <= 1.0
    assert "loss/mlm" not in records[3]
    student = AlbertModel.from_pretrained(str(tmp_path / "run" / "student"))
    assert student.config.num_hidden_layers == 2
