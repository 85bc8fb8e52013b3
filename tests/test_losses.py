"""Each loss term against a value computed by hand, element by element."""

import math

import pytest
import torch

from components.losses import (
    AttentionKLLoss,
    DistillationLoss,
    FeatureMapLoss,
    HiddenAlignmentLoss,
    MaskedLMLoss,
    MeanVarianceLoss,
    MINIALBERT_WEIGHTS,
    OutputKLLoss,
    resolve_layer_map,
)
from components.models import EncoderOutput, EncoderSpec


def softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_masked_lm_loss():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 1])
    expected = (-math.log(softmax([2.0, 0.5, -1.0])[0]) - math.log(softmax([0.0, 1.0, 3.0])[1])) / 2
    assert MaskedLMLoss()(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert MaskedLMLoss()(logits, labels, "sum").item() == pytest.approx(2 * expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_output_kl_with_temperature(temperature):
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[2.0, -1.0, 0.0], [0.0, 1.0, 1.0]])
    t = temperature
    per_row = [
        kl(softmax([v / t for v in tr]), softmax([v / t for v in sr])) * t * t
        for sr, tr in zip(student.tolist(), teacher.tolist())
    ]
    loss = OutputKLLoss(temperature)(student, teacher)
    assert loss.item() == pytest.approx(sum(per_row) / 2, rel=1e-6)
    assert OutputKLLoss()(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("metric", ["cosine", "mse"])
def test_hidden_alignment_ignores_padding(metric):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    per_token = []
    for b in range(2):
        for i in range(3):
            if mask[b, i]:
                s, t = student[b, i].tolist(), teacher[b, i].tolist()
                per_token.append(
                    1 - cosine(s, t) if metric == "cosine" else sum((x - y) ** 2 for x, y in zip(s, t)) / 4
                )
    loss = HiddenAlignmentLoss(metric)(student, teacher, mask)
    assert loss.item() == pytest.approx(sum(per_token) / 4, rel=1e-5)
    # what padding holds does not matter
    teacher[1, 1:] = 1e6
    assert HiddenAlignmentLoss(metric)(student, teacher, mask).item() == pytest.approx(loss.item(), rel=1e-6)


def attention_probs(heads, seq, mask_row, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(1, heads, seq, seq, generator=g)
    scores = scores.masked_fill(torch.tensor(mask_row)[None, None, None, :] == 0, float("-inf"))
    return scores.softmax(-1)


def test_attention_kl_per_head_over_valid_queries():
    mask_row = [1, 1, 1, 0]
    student, teacher = attention_probs(2, 4, mask_row, 1), attention_probs(2, 4, mask_row, 2)
    per_query = []
    for q in range(3):  # valid query rows only
        per_query.append(sum(kl(teacher[0, h, q].tolist(), student[0, h, q].tolist()) for h in range(2)) / 2)
    loss = AttentionKLLoss()(student, teacher, torch.tensor([mask_row]))
    assert loss.item() == pytest.approx(sum(per_query) / 3, rel=1e-5)
    assert math.isfinite(loss.item())


def test_attention_kl_groups_teacher_heads_when_the_counts_divide():
    """4 teacher heads over 2 student heads: student head h against the mean of teacher heads
    2h and 2h+1 (the documented rule), per head."""
    mask_row = [1, 1, 1]
    student, teacher = attention_probs(2, 3, mask_row, 3), attention_probs(4, 3, mask_row, 4)
    expected = 0.0
    for q in range(3):
        for h in range(2):
            t = [(teacher[0, 2 * h, q, k].item() + teacher[0, 2 * h + 1, q, k].item()) / 2 for k in range(3)]
            expected += kl(t, student[0, h, q].tolist()) / 2
    loss = AttentionKLLoss()(student, teacher, torch.tensor([mask_row]))
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)


def test_attention_kl_averages_heads_when_counts_do_not_divide():
    mask_row = [1, 1, 1]
    student, teacher = attention_probs(2, 3, mask_row, 3), attention_probs(3, 3, mask_row, 4)
    expected = 0.0
    for q in range(3):
        s = [sum(student[0, h, q, k].item() for h in range(2)) / 2 for k in range(3)]
        t = [sum(teacher[0, h, q, k].item() for h in range(3)) / 3 for k in range(3)]
        expected += kl(t, s)
    loss = AttentionKLLoss()(student, teacher, torch.tensor([mask_row]))
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)


def test_feature_map_and_mean_variance_terms_by_hand():
    s = torch.tensor([[[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 1.0, 1.0], [9.0, 9.0, 9.0, 9.5]]])
    t = torch.tensor([[[2.0, 1.0, 0.0, 1.0], [1.0, 3.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding

    def normed(v):
        m = sum(v) / len(v)
        var = sum((x - m) ** 2 for x in v) / len(v)
        return [(x - m) / math.sqrt(var + 1e-5) for x in v]

    def stats(v):
        m = sum(v) / len(v)
        return m, sum((x - m) ** 2 for x in v) / len(v)

    fm = [sum((a - b) ** 2 for a, b in zip(normed(s[0, i].tolist()), normed(t[0, i].tolist()))) / 4 for i in range(2)]
    assert FeatureMapLoss()(s, t, mask).item() == pytest.approx(sum(fm) / 2, rel=1e-5)
    means = [(stats(s[0, i].tolist())[0] - stats(t[0, i].tolist())[0]) ** 2 for i in range(2)]
    variances = [abs(stats(s[0, i].tolist())[1] - stats(t[0, i].tolist())[1]) for i in range(2)]
    assert MeanVarianceLoss("mean")(s, t, mask).item() == pytest.approx(sum(means) / 2, rel=1e-5)
    assert MeanVarianceLoss("variance")(s, t, mask).item() == pytest.approx(sum(variances) / 2, rel=1e-5)
    # invariant to the scale and offset of either side: it transfers the shape of the features
    assert FeatureMapLoss()(3 * s + 7, t, mask).item() == pytest.approx(FeatureMapLoss()(s, t, mask).item(), rel=1e-3)


def test_layer_maps():
    assert resolve_layer_map("uniform", 6, 12) == [(i, 2 * i) for i in range(1, 7)]
    assert resolve_layer_map("uniform", 6, 24) == [(i, 4 * i) for i in range(1, 7)]
    assert resolve_layer_map([3, None, 12], 3, 12) == [(1, 3), (3, 12)]
    assert resolve_layer_map({2: 5, 1: 1}, 2, 6) == [(1, 1), (2, 5)]
    with pytest.raises(ValueError, match="teacher layer 13 is outside 1..12"):
        resolve_layer_map([13], 1, 12)
    with pytest.raises(ValueError, match="lists 2 teacher layers for a student with 3"):
        resolve_layer_map([1, 2], 3, 12)


def specs(student_hidden=8, teacher_head=True):
    return (
        EncoderSpec(num_layers=2, hidden_size=student_hidden, num_heads=2, vocab_size=5, has_mlm_head=True),
        EncoderSpec(num_layers=4, hidden_size=8, num_heads=2, vocab_size=5, has_mlm_head=teacher_head),
    )


def records(seed, batch=2, seq=3, student_hidden=8):
    g = torch.Generator().manual_seed(seed)

    def probs(heads):
        return torch.randn(batch, heads, seq, seq, generator=g).softmax(-1)

    labels = torch.full((batch, seq), -100)
    labels[0, 1], labels[1, 0] = 2, 4
    student = EncoderOutput(
        hidden_states=tuple(torch.randn(batch, seq, student_hidden, generator=g) for _ in range(3)),
        attentions={1: probs(2), 2: probs(2)},
        logits=torch.randn(2, 5, generator=g),
    )
    teacher = EncoderOutput(
        hidden_states=tuple(torch.randn(batch, seq, 8, generator=g) for _ in range(5)),
        attentions={2: probs(2), 4: probs(2)},
        logits=torch.randn(2, 5, generator=g),
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return student, teacher, labels, mask


def test_composite_is_the_weighted_sum_of_its_terms():
    loss_fn = DistillationLoss(*specs(), weights={**MINIALBERT_WEIGHTS, "embedding": 2.0})
    student, teacher, labels, mask = records(0)
    out = loss_fn(student, teacher, labels, mask)
    masked = labels[labels != -100]
    expected = {
        "mlm": MaskedLMLoss()(student.logits, masked),
        "output": OutputKLLoss()(student.logits, teacher.logits),
        "hidden": sum(
            HiddenAlignmentLoss()(student.hidden_states[s], teacher.hidden_states[t], mask) for s, t in [(1, 2), (2, 4)]
        ),
        "attention": sum(
            AttentionKLLoss()(student.attentions[s], teacher.attentions[t], mask) for s, t in [(1, 2), (2, 4)]
        ),
        "embedding": HiddenAlignmentLoss()(student.hidden_states[0], teacher.hidden_states[0], mask),
    }
    assert set(out.terms) == set(expected)
    for name, value in expected.items():
        assert out.terms[name].item() == pytest.approx(value.item(), rel=1e-6), name
    weights = {**MINIALBERT_WEIGHTS, "embedding": 2.0}
    assert out.total.item() == pytest.approx(sum(weights[k] * v.item() for k, v in expected.items()), rel=1e-6)
    assert MINIALBERT_WEIGHTS == {"mlm": 1.0, "output": 5.0, "hidden": 3.0, "attention": 3.0, "embedding": 0.0}


def test_split_batches_with_global_counts_equal_one_batch():
    loss_fn = DistillationLoss(*specs())
    student, teacher, labels, mask = records(1)
    whole = loss_fn(student, teacher, labels, mask).total

    def part(rec, rows, logit_rows):
        return EncoderOutput(
            tuple(h[rows] for h in rec.hidden_states),
            {k: a[rows] for k, a in rec.attentions.items()},
            rec.logits[logit_rows],
        )

    total = 0.0
    for row in (0, 1):
        rows = slice(row, row + 1)
        total += loss_fn(
            part(student, rows, rows), part(teacher, rows, rows), labels[rows], mask[rows], num_masked=2, num_tokens=5
        ).total
    assert total.item() == pytest.approx(whole.item(), rel=1e-6)


def test_sentence_term_compares_mean_pooled_last_layers_by_hand():
    loss_fn = DistillationLoss(*specs(), weights={"sentence": 1.0})
    student, teacher, labels, mask = records(2)
    out = loss_fn(student, teacher, labels, mask)
    assert set(out.terms) == {"sentence"}
    expected = []
    for row in range(2):
        n = int(mask[row].sum())  # the padding token of row 1 is not in its mean
        s = [sum(student.hidden_states[-1][row, i, d].item() for i in range(n)) / n for d in range(8)]
        t = [sum(teacher.hidden_states[-1][row, i, d].item() for i in range(n)) / n for d in range(8)]
        expected.append(1 - cosine(s, t))
    assert out.terms["sentence"].item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    # packed: two sequences in one row (segments 1 and 2) are the same two sentences
    packed = loss_fn(
        EncoderOutput(tuple(torch.cat([h[0], h[1, :2]])[None] for h in student.hidden_states), {}, None),
        EncoderOutput(tuple(torch.cat([h[0], h[1, :2]])[None] for h in teacher.hidden_states), {}, None),
        torch.full((1, 5), -100),
        torch.ones(1, 5, dtype=torch.long),
        segment_ids=torch.tensor([[1, 1, 1, 2, 2]]),
    )
    assert packed.terms["sentence"].item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    # divided by the step's sequence count when given (split micro-batches)
    half = loss_fn(student, teacher, labels, mask, num_sequences=4)
    assert half.terms["sentence"].item() == pytest.approx(sum(expected) / 4, rel=1e-5)


def test_layer_weights_scale_each_mapped_layer():
    student, teacher, labels, mask = records(3)
    per_layer = [
        HiddenAlignmentLoss()(student.hidden_states[s], teacher.hidden_states[t], mask) for s, t in [(1, 2), (2, 4)]
    ]
    weighted = DistillationLoss(*specs(), weights={"hidden": 1.0}, layer_weights={2: 3.0})
    out = weighted(student, teacher, labels, mask)
    assert out.terms["hidden"].item() == pytest.approx((per_layer[0] + 3 * per_layer[1]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="layer_weights names student layer 3, which the layer map does not map"):
        DistillationLoss(*specs(), weights={"hidden": 1.0}, layer_weights={3: 2.0})
    with pytest.raises(ValueError, match="negative weight"):
        DistillationLoss(*specs(), weights={"hidden": 1.0}, layer_weights={1: -1.0})


def test_sentence_term_needs_a_projection_for_the_last_layer():
    narrow = specs(student_hidden=4)
    with pytest.raises(ValueError, match="sentence term compares the student's last layer"):
        DistillationLoss(*narrow, weights={"sentence": 1.0}, layer_map=[2, None], projection="per_layer")
    loss_fn = DistillationLoss(*narrow, weights={"sentence": 1.0}, layer_map=[2, 4], projection="per_layer")
    student, teacher, labels, mask = records(4, student_hidden=4)
    assert loss_fn(student, teacher, labels, mask).terms["sentence"].item() > 0


def test_projection_when_student_is_narrower():
    loss_fn = DistillationLoss(*specs(student_hidden=4))
    assert loss_fn.projection is not None and loss_fn.projection.weight.shape == (8, 4)
    student, teacher, labels, mask = records(2, student_hidden=4)
    out = loss_fn(student, teacher, labels, mask)
    out.total.backward()
    assert loss_fn.projection.weight.grad is not None


def test_per_layer_projections_train_only_for_the_active_layers():
    loss_fn = DistillationLoss(*specs(student_hidden=4), weights={"feature_map": 1.0}, projection="per_layer")
    assert loss_fn.projection is None and sorted(loss_fn.projections) == ["0", "1", "2"]
    loss_fn.set_layers([2])
    student, teacher, labels, mask = records(2, student_hidden=4)
    loss_fn(student, teacher, labels, mask).total.backward()
    grads = {name: p.weight.grad for name, p in loss_fn.projections.items()}
    assert grads["2"] is not None and grads["1"] is None and grads["0"] is None
    with pytest.raises(ValueError, match="projection must be 'shared' or 'per_layer'"):
        DistillationLoss(*specs(student_hidden=4), projection="each")


def test_inactive_terms_ask_for_nothing():
    loss_fn = DistillationLoss(*specs(), weights={"hidden": 1.0})
    assert loss_fn.student_attention_layers() == set() and loss_fn.teacher_attention_layers() == set()
    assert not loss_fn.needs_student_logits and not loss_fn.needs_teacher_logits
    student, teacher, labels, mask = records(3)
    assert set(loss_fn(student, teacher, labels, mask).terms) == {"hidden"}


def test_weight_errors_are_clear():
    with pytest.raises(ValueError, match="teacher has no MLM head.*loss.weights.output=0"):
        DistillationLoss(*specs(teacher_head=False))
    assert DistillationLoss(*specs(teacher_head=False), weights={"mlm": 1, "hidden": 3}).weights["output"] == 0
    with pytest.raises(ValueError, match=r"Unknown loss terms \['hiden'\]"):
        DistillationLoss(*specs(), weights={"hiden": 1})
    with pytest.raises(ValueError, match="vocabulary"):
        DistillationLoss(specs()[0], EncoderSpec(4, 8, 2, vocab_size=6, has_mlm_head=True))


def test_uniform_map_rounds_half_up():
    assert [t for _, t in resolve_layer_map("uniform", 8, 12)] == [2, 3, 5, 6, 8, 9, 11, 12]


def test_attention_kl_per_element_divides_by_sequence_length():
    mask_row = [1, 1, 1, 0]
    student, teacher = attention_probs(2, 4, mask_row, 5), attention_probs(2, 4, mask_row, 6)
    mask = torch.tensor([mask_row])
    per_distribution = AttentionKLLoss("distribution")(student, teacher, mask)
    assert AttentionKLLoss("element")(student, teacher, mask).item() == pytest.approx(
        per_distribution.item() / 4, rel=1e-6
    )
