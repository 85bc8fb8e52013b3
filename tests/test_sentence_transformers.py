"""A sentence-embedding teacher's student is a sentence-transformers folder: SentenceTransformer
loads it as it is and its embeddings are our student's, mean-pooled; and no student folder makes
transformers initialise anything at random when it loads."""

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import components  # noqa: F401  (registers the native model types: the documented route for adapter students)
from components.checkpointing import CheckpointError, load_student, save_student
from components.checkpointing.sentence_transformers import read_sentence_modules
from components.models.bottleneck import bottleneck_tiny
from components.models.recursive import recursive_tiny
from tests.helpers import make_hf_teacher, REPO

pytest.importorskip("sentence_transformers")

# fp32 sums of at most a few hundred products of O(1) values, in another order than ours
# (transformers' ALBERT, sentence-transformers' pooling): agreement to ~1e-6 of the values' scale
RTOL = 1e-5
TEXTS = ["the value of the object is returned", "a module", "if the file does not exist an error is raised here"]
TEACHER_HIDDEN = 48  # the students are 32 (distilled) or 64 (recursive_tiny) wide: the pooling width must follow


def make_sentence_teacher(folder: Path, tokenizer) -> Path:
    """A BertModel without MLM head plus the files sentence-transformers/all-MiniLM-L6-v2 has."""
    make_hf_teacher(folder, tokenizer, kind="bert-no-head", hidden=TEACHER_HIDDEN)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "cosine"}))
    (folder / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": TEACHER_HIDDEN, "pooling_mode_cls_token": False}
    pooling.update(
        pooling_mode_mean_tokens=True, pooling_mode_max_tokens=False, pooling_mode_mean_sqrt_len_tokens=False
    )
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


@pytest.fixture(scope="module")
def sentence_teacher(tmp_path_factory, tokenizer):
    return make_sentence_teacher(tmp_path_factory.mktemp("sentence_teacher"), tokenizer)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, sentence_teacher, documents):
    """configs/embedding_teacher.yaml, shrunk, on the sentence teacher: 2 steps."""
    from omegaconf import OmegaConf

    from tests.recipe_helpers import override, run_recipe

    tmp = tmp_path_factory.mktemp("sentence_run")
    sentences = tmp / "sentences.txt"
    sentences.write_text("\n".join(s.strip() for d in documents for s in d.split(". ") if 3 < len(s.split()) < 20))
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "embedding_teacher.yaml"))
    small = {"hidden_size": 32, "embedding_size": 16, "num_heads": 4, "intermediate_size": 64, "num_iterations": 2}
    cfg = override(
        cfg,
        {
            "output_dir": str(tmp / "run"),
            "teacher.path": str(sentence_teacher),
            "data.source": str(sentences),
            "data.hub_config": None,
            "data.max_length": 32,
            "data.stride": 24,
            "data.batch_size": 8,
            "data.eval_fraction": 0.0,
            **{f"student.{k}": v for k, v in small.items()},
            "student.max_position_embeddings": 40,  # under the teacher's max_seq_length (64)
            "max_steps": 2,
            "eval_every_n_steps": None,
            "save_every_n_steps": None,
        },
    )
    run_recipe(cfg)
    return tmp / "run" / "student"


def our_embeddings(folder: Path, max_length: int) -> torch.Tensor:
    """Our student's last hidden states, mean-pooled over the real tokens, unit length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    student = load_student(str(folder)).eval()
    with torch.no_grad():
        hidden = student(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def check_sentence_transformers(folder: Path, hidden: int, max_seq_length: int) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    assert model.max_seq_length == max_seq_length
    theirs = model.encode(TEXTS, convert_to_tensor=True)
    ours = our_embeddings(folder, max_seq_length)
    assert theirs.shape == (len(TEXTS), hidden)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=RTOL * float(ours.abs().max()))


def test_the_teacher_is_a_sentence_transformers_model(sentence_teacher):
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(sentence_teacher), device="cpu").encode(TEXTS).shape == (3, TEACHER_HIDDEN)


def test_distilled_student_of_a_sentence_teacher_loads_in_sentence_transformers(distilled):
    """The recipe's student (adapter-free: an AlbertModel) with the teacher's pipeline."""
    assert json.loads((distilled / "config.json").read_text())["architectures"] == ["AlbertModel"]
    modules = json.loads((distilled / "modules.json").read_text())
    assert [(m["idx"], m["path"], m["type"].rsplit(".", 1)[1]) for m in modules] == [
        (0, "", "Transformer"),
        (1, "1_Pooling", "Pooling"),
        (2, "2_Normalize", "Normalize"),
    ]
    assert json.loads((distilled / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 32
    assert json.loads((distilled / "config_sentence_transformers.json").read_text()) == {"similarity_fn_name": "cosine"}
    check_sentence_transformers(distilled, hidden=32, max_seq_length=40)


def test_student_with_adapters_loads_in_sentence_transformers(tmp_path, sentence_teacher, tokenizer):
    """A native student (adapters): SentenceTransformer loads it once ``import components`` has
    registered its model type."""
    torch.manual_seed(0)
    student = recursive_tiny(adapter_placement="minialbert", mlm_head=False, vocab_size=len(tokenizer))
    for p in student.adapter_parameters():  # make the adapters matter
        torch.nn.init.normal_(p, std=0.1)
    modules = read_sentence_modules(sentence_teacher)
    assert save_student(student, tmp_path / "s", tokenizer, sentence_modules=modules) == "native"
    check_sentence_transformers(tmp_path / "s", hidden=64, max_seq_length=64)


def test_a_teacher_without_modules_json_gives_no_sentence_transformers_files(teacher_dir, distilled_student):
    assert read_sentence_modules(teacher_dir) is None
    written = {p.name for p in distilled_student.iterdir()}
    assert not written & {"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling"}


def test_modules_with_weights_are_left_out_and_a_broken_modules_json_is_refused(tmp_path, sentence_teacher, caplog):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    for name in ("sentence_bert_config.json", "1_Pooling"):
        (teacher / name).symlink_to(sentence_teacher / name)
    modules = json.loads((sentence_teacher / "modules.json").read_text())
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    (teacher / "modules.json").write_text(json.dumps([*modules[:2], dense, {**modules[2], "idx": 3, "name": "3"}]))
    with caplog.at_level(logging.WARNING):
        read = read_sentence_modules(teacher)
    assert [entry["path"] for entry, _ in read.modules] == ["1_Pooling", "2_Normalize"]
    assert "sentence_transformers.models.Dense (2_Dense)" in caplog.text
    (teacher / "modules.json").write_text(json.dumps([modules[0], {**modules[1], "path": "../elsewhere"}]))
    with pytest.raises(CheckpointError, match=r"modules.json: entry 1 has \"path\" '../elsewhere'"):
        read_sentence_modules(teacher)


@contextmanager
def transformers_warnings():
    """What transformers logs at WARNING and above (its loggers do not propagate to the root's)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("kind", ["albert", "mobilebert", "native"])
def test_a_headless_student_loads_without_newly_initialized_weights(tmp_path, kind):
    """No "newly initialized" report: ALBERT's pooler is written as an identity, MobileBERT's
    has no weights (``classifier_activation: false``)."""
    import transformers

    torch.manual_seed(0)
    student = {
        "albert": lambda: recursive_tiny(adapter_placement=None, mlm_head=False),
        "mobilebert": lambda: bottleneck_tiny(mlm_head=False),
        "native": lambda: recursive_tiny(adapter_placement="minialbert", mlm_head=False),
    }[kind]().eval()
    assert save_student(student, tmp_path / "s") == kind
    model_class = {"albert": transformers.AlbertModel, "mobilebert": transformers.MobileBertModel}
    with transformers_warnings() as warnings:
        loaded = model_class.get(kind, transformers.AutoModel).from_pretrained(str(tmp_path / "s")).eval()
    assert not [r.getMessage() for r in warnings]
    if kind == "albert":  # the pooler is tanh of the [CLS] state, and reading the folder back drops it
        ids = torch.randint(5, 1000, (2, 7))
        out = loaded(input_ids=ids)
        torch.testing.assert_close(out.pooler_output, torch.tanh(out.last_hidden_state[:, 0]))
        assert torch.equal(
            load_student(str(tmp_path / "s")).eval()(ids).last_hidden_state, student(ids).last_hidden_state
        )
