"""Students and fine-tuned models through transformers' Auto classes and pipelines, with outputs
equal to our own forward."""

import subprocess
import sys

import pytest
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    pipeline,
)

import components  # noqa: F401  (registers the model types)
from components.checkpointing import load_student, save_student
from components.checkpointing.finetuned import save_task_model
from components.models.heads import TaskModel
from components.models.recursive import recursive_tiny

ATOL = 1e-5
SENTENCE = "the value of the object is returned"

STUDENTS = {
    # adapters + a tied E-wide head: native format
    "adapters": dict(adapter_placement="minialbert", tie_word_embeddings=True),
    # adapter-free with MiniALBERT's H-wide head: native format too
    "wide_head": dict(adapter_placement=None, mlm_head_size=64),
    # adapter-free with ALBERT's head: written as a plain ALBERT checkpoint
    "albert": dict(adapter_placement=None),
}


def _perturbed(model):
    """Random non-zero weights everywhere (adapters start as identities otherwise)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def students(tmp_path_factory, tokenizer):
    """{kind: (model, folder)} for every kind of student."""
    out = {}
    for kind, kwargs in STUDENTS.items():
        torch.manual_seed(0)
        model = _perturbed(recursive_tiny(vocab_size=len(tokenizer), dropout=0.0, attention_dropout=0.0, **kwargs))
        folder = tmp_path_factory.mktemp(kind) / "student"
        fmt = save_student(model, folder, tokenizer)
        assert fmt == ("albert" if kind == "albert" else "native")
        out[kind] = (model, folder)
    return out


@pytest.fixture(params=sorted(STUDENTS))
def student(request, students):
    return (request.param, *students[request.param])


def _batch(tokenizer):
    enc = tokenizer([SENTENCE, "a short one"], padding=True, return_tensors="pt")
    assert not enc["attention_mask"].all()  # padding is exercised
    return enc


def test_auto_classes_reproduce_our_forward(student, tokenizer):
    kind, model, folder = student
    enc = _batch(tokenizer)
    ours = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], attention_layers=(1, 2))
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == ("albert" if kind == "albert" else "recursive_encoder")

    mlm = AutoModelForMaskedLM.from_pretrained(folder).eval()
    out = mlm(**enc, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(out.logits, ours.logits, atol=ATOL, rtol=0)
    real = enc["attention_mask"].bool()
    assert len(out.hidden_states) == len(ours.hidden_states) == 3
    for theirs, mine in zip(out.hidden_states[1:], ours.hidden_states[1:]):
        torch.testing.assert_close(theirs[real], mine[real], atol=ATOL, rtol=0)
    for theirs, mine in zip(out.attentions, (ours.attentions[1], ours.attentions[2])):
        torch.testing.assert_close(theirs, mine, atol=ATOL, rtol=0)

    base = AutoModel.from_pretrained(folder).eval()
    hidden = base(**enc).last_hidden_state
    torch.testing.assert_close(hidden[real], ours.last_hidden_state[real], atol=ATOL, rtol=0)
    if kind == "adapters":  # tied decoder stays tied after loading
        assert mlm.encoder.mlm_head.decoder.weight is mlm.encoder.embeddings.word_embeddings.weight


def test_pipelines_reproduce_our_forward(student, tokenizer):
    _, model, folder = student
    fill = pipeline("fill-mask", model=str(folder))
    text = f"the {fill.tokenizer.mask_token} of the object"
    enc = tokenizer(text, return_tensors="pt")
    logits = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).logits[0]
    position = int((enc["input_ids"][0] == tokenizer.mask_token_id).nonzero())
    best = logits[position].softmax(-1).topk(3)
    predictions = fill(text, top_k=3)
    assert [p["token"] for p in predictions] == best.indices.tolist()
    assert [p["score"] for p in predictions] == pytest.approx(best.values.tolist(), abs=1e-5)

    features = pipeline("feature-extraction", model=str(folder))(SENTENCE, return_tensors=True)
    enc = tokenizer(SENTENCE, return_tensors="pt")
    ours = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], return_logits=False)
    torch.testing.assert_close(features, ours.last_hidden_state, atol=ATOL, rtol=0)


def test_albert_needs_no_import_of_ours_and_autotokenizer_warns_about_nothing(students):
    """One fresh interpreter: the ALBERT student loads before anything of ours is imported; then,
    after ``import components``, AutoTokenizer reads every student folder without a warning."""
    folders = {kind: str(folder) for kind, (_, folder) in students.items()}
    code = f"""
import sys, transformers
m = transformers.AutoModelForMaskedLM.from_pretrained({folders["albert"]!r})
assert type(m).__name__ == "AlbertForMaskedLM", type(m)
assert "components" not in sys.modules
import components
print("---", file=sys.stderr)
for folder in {sorted(folders.values())!r}:
    transformers.AutoTokenizer.from_pretrained(folder)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    after = result.stderr.split("---\n", 1)[1]
    assert after.strip() == "", after


def test_save_pretrained_round_trips_into_our_loader(student, tokenizer, tmp_path):
    kind, model, folder = student
    if kind == "albert":
        pytest.skip("ALBERT checkpoints are transformers' own format")
    AutoModelForMaskedLM.from_pretrained(folder).save_pretrained(tmp_path / "again")
    again = load_student(str(tmp_path / "again")).eval()
    enc = _batch(tokenizer)
    torch.testing.assert_close(again(**enc).logits, model(**enc).logits, atol=ATOL, rtol=0)


def test_a_fresh_head_on_a_student_trains_in_transformers(student, tokenizer):
    kind, _, folder = student
    if kind == "albert":
        pytest.skip("ALBERT has its own classification classes")
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    enc = _batch(tokenizer)
    out = model(**enc, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    assert model.head.classifier.weight.grad is not None
    if kind == "adapters":  # adapters were loaded, not re-initialised
        assert model.encoder.adapters[0]["attention_in"].up.weight.abs().max() > 0


# ------------------------------------------------------------------ fine-tuned models
@pytest.fixture(scope="module", params=["classification", "regression", "token_classification"])
def finetuned(request, tmp_path_factory, tokenizer):
    task_type = request.param
    torch.manual_seed(0)
    encoder = recursive_tiny(vocab_size=len(tokenizer), mlm_head=False, dropout=0.0, attention_dropout=0.0)
    labels = {
        "classification": ["negative", "positive"],
        "regression": None,
        "token_classification": ["O", "B-X", "I-X"],
    }
    names = labels[task_type]
    model = _perturbed(TaskModel(encoder, task_type, len(names) if names else 1, dropout=0.0))
    folder = tmp_path_factory.mktemp(task_type) / "model"
    save_task_model(model, folder, {"type": task_type, "label_names": names}, tokenizer)
    return task_type, model, folder, names


def test_finetuned_models_load_through_their_auto_class(finetuned, tokenizer):
    task_type, model, folder, names = finetuned
    auto = (
        AutoModelForTokenClassification if task_type == "token_classification" else AutoModelForSequenceClassification
    )
    other = (
        AutoModelForSequenceClassification
        if auto is AutoModelForTokenClassification
        else AutoModelForTokenClassification
    )
    loaded = auto.from_pretrained(folder).eval()
    enc = _batch(tokenizer)
    logits = loaded(**enc).logits
    ours = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    torch.testing.assert_close(logits.squeeze(-1) if task_type == "regression" else logits, ours, atol=ATOL, rtol=0)
    if names:
        assert loaded.config.id2label == dict(enumerate(names))
    else:
        assert loaded.config.problem_type == "regression"
    with pytest.raises(ValueError, match=f"fine-tuned for {task_type}"):
        other.from_pretrained(folder)
    hidden = AutoModel.from_pretrained(folder).eval()(**enc).last_hidden_state
    mine = model.encoder(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).last_hidden_state
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], mine[real], atol=ATOL, rtol=0)


def test_text_classification_pipeline_names_the_runs_labels(finetuned, tokenizer):
    task_type, model, folder, names = finetuned
    if task_type != "classification":
        pytest.skip("one pipeline is enough")
    predictions = pipeline("text-classification", model=str(folder), top_k=None)([SENTENCE])[0]
    enc = tokenizer(SENTENCE, return_tensors="pt")
    probs = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])[0].softmax(-1)
    assert {p["label"]: p["score"] for p in predictions} == pytest.approx(dict(zip(names, probs.tolist())), abs=1e-5)


def test_registration_is_idempotent():
    from components.checkpointing.auto import register

    register()
    register()
    assert transformers.AutoConfig.for_model("recursive_encoder").model_type == "recursive_encoder"


def test_from_config_initialises_like_our_builder():
    from components.checkpointing.auto_configs import StudentConfig

    model = AutoModel.from_config(StudentConfig(recursive_encoder=recursive_tiny().config))
    for adapters in model.encoder.adapters:  # adapters start as identities, as in RecursiveEncoder
        assert all(adapter.up.weight.abs().max() == 0 for adapter in adapters.values())
    assert model.encoder.layer.ffn_in.weight.std().item() == pytest.approx(0.02, rel=0.1)
