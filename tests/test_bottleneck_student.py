"""The bottleneck (MobileBERT) student through everything the recursive one goes through: the
written student interface, save/load, transformers, the distillation recipe with a progressive
schedule, fine-tuning. Parity of the modules themselves is tests/test_mobilebert.py's."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForMaskedLM, MobileBertForMaskedLM, pipeline

import components  # noqa: F401  (registers the native formats with transformers)
from components.checkpointing import load_student, save_student
from components.models import bottleneck_tiny, BottleneckEncoder, recursive_tiny, RecursiveEncoder
from components.models.student import check_student, Student

ATOL = 1e-5


def _model(tokenizer, **kwargs):
    torch.manual_seed(0)
    model = bottleneck_tiny(vocab_size=len(tokenizer), attention_dropout=0.0, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _batch(tokenizer):
    return tokenizer(["the value of the object is returned", "a short one"], padding=True, return_tensors="pt")


def _logits(model, enc):
    return model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).logits


def test_both_families_implement_the_student_interface(tokenizer):
    for model in (_model(tokenizer), recursive_tiny(vocab_size=len(tokenizer))):
        assert isinstance(model, Student)
        check_student(model)
    with pytest.raises(Exception, match="is not a student"):
        check_student(torch.nn.Linear(2, 2))


def test_a_bottleneck_student_is_written_as_a_transformers_mobilebert(tokenizer, tmp_path):
    model = _model(tokenizer)
    assert save_student(model, tmp_path / "s", tokenizer) == "mobilebert"
    enc = _batch(tokenizer)
    theirs = MobileBertForMaskedLM.from_pretrained(tmp_path / "s", attn_implementation="eager").eval()
    torch.testing.assert_close(theirs(**enc).logits, _logits(model, enc), atol=ATOL, rtol=0)
    again = load_student(str(tmp_path / "s")).eval()
    assert isinstance(again, BottleneckEncoder) and again.config == model.config
    torch.testing.assert_close(_logits(again, enc), _logits(model, enc), atol=0, rtol=0)
    fill = pipeline("fill-mask", model=str(tmp_path / "s"))
    assert len(fill(f"the {fill.tokenizer.mask_token} of the object")) == 5


def test_ib_bert_shaped_students_use_the_native_format_and_the_auto_classes(tokenizer, tmp_path):
    """Neither attention flag with H != I: transformers' MobileBERT cannot build it."""
    model = _model(tokenizer, use_bottleneck_attention=False, key_query_shared_bottleneck=False)
    assert save_student(model, tmp_path / "s", tokenizer) == "native"
    with pytest.raises(ValueError, match="cannot be written as 'mobilebert'"):
        save_student(model, tmp_path / "t", format="mobilebert")
    enc = _batch(tokenizer)
    auto = AutoModelForMaskedLM.from_pretrained(tmp_path / "s").eval()
    assert type(auto).__name__ == "BottleneckEncoderForMaskedLM"
    torch.testing.assert_close(auto(**enc).logits, _logits(model, enc), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        _logits(load_student(str(tmp_path / "s")).eval(), enc), _logits(model, enc), atol=0, rtol=0
    )


def test_recursive_students_keep_their_formats(tokenizer, tmp_path):
    plain = recursive_tiny(vocab_size=len(tokenizer), adapter_placement=None)
    assert save_student(plain, tmp_path / "a") == "albert"
    with_adapters = recursive_tiny(vocab_size=len(tokenizer))
    assert save_student(with_adapters, tmp_path / "b") == "native"
    assert isinstance(load_student(str(tmp_path / "b")), RecursiveEncoder)
    with pytest.raises(ValueError, match="cannot be written as 'mobilebert'"):
        save_student(with_adapters, tmp_path / "c", format="mobilebert")


@pytest.mark.slow  # the smoke assets (a pre-trained teacher, the stdlib corpus)
def test_mobilebert_tiny_config_end_to_end(tmp_path, smoke_assets, run_main):
    """The shipped progressive smoke config, shortened: 4 layer phases of 2 steps, then 4 steps of
    pre-training distillation; the student loads as a transformers MobileBERT. (Through the
    recipe's main in this process: tests/test_tune_run.py launches this recipe with tune run.)"""
    out = tmp_path / "mobilebert"
    result = run_main(
        "distill_recursive",
        "--config",
        "configs/mobilebert_tiny.yaml",
        f"output_dir={out}",
        "stages.steps_per_layer=2",
        "max_steps=12",
        "eval_every_n_steps=null",
        "save_every_n_steps=null",
        "log_every_n_steps=1",
        f"teacher.assets_dir={smoke_assets}",
        f"data.source.assets_dir={smoke_assets}",
    )
    assert result.code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = OmegaConf.load(out / "config.yaml")
    assert [s.name for s in saved.stages] == ["layer_1", "layer_2", "layer_3", "layer_4", "pretrain_distill"]
    assert "Copied the teacher's embeddings.position_embeddings.weight" in result.log
    student = load_student(str(out / "student")).eval()
    theirs = MobileBertForMaskedLM.from_pretrained(out / "student", attn_implementation="eager").eval()
    ids = torch.randint(5, student.spec.vocab_size, (2, 16))
    torch.testing.assert_close(theirs(input_ids=ids).logits, student(ids).logits, atol=ATOL, rtol=0)


def test_a_bottleneck_student_fine_tunes_with_the_same_recipe(tokenizer, tmp_path):
    from components.smoke.tasks import smoke_task
    from tests.test_finetune import finetune_config, run_finetune

    save_student(_model(tokenizer), tmp_path / "student", tokenizer)
    files = smoke_task(str(tmp_path / "task"), "sst2")
    run_finetune(finetune_config(tmp_path / "ft", tmp_path / "student", files, tuning="full", max_steps=4))
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft" / "model")
    assert type(loaded.encoder).__name__ == "BottleneckEncoder"


def test_a_teacher_of_another_shape_teaches_through_per_layer_projections(tmp_path, tokenizer):
    """A stock BERT (here 8 heads, 48 wide, 2 layers) teaches a 2-block bottleneck student (4 heads,
    64 wide): one learned projection per block, teacher heads matched in groups of two."""
    from components.training.run import execute
    from recipes.distill_recursive import DistillRecursiveRecipe
    from tests.helpers import make_hf_teacher
    from tests.recipe_helpers import tiny_config

    teacher = make_hf_teacher(tmp_path / "teacher", tokenizer, layers=2, hidden=48)
    import json

    config = json.loads((teacher / "config.json").read_text())
    config["num_attention_heads"] = 8
    (teacher / "config.json").write_text(json.dumps(config))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"the value {i} of the object is returned to the caller" for i in range(64)))
    cfg = tiny_config(tmp_path / "run", teacher, corpus, max_steps=6, save_every_n_steps=None)
    cfg["student"] = {
        "_component_": "components.models.bottleneck_tiny",
        "num_layers": 2,
        "max_position_embeddings": 80,
    }
    cfg["loss"].update(projection="per_layer", attention_reduction="distribution")
    cfg["stages"] = {
        "_component_": "components.training.progressive_stages",
        "num_layers": 2,
        "steps_per_layer": 2,
        "also_trainable": ["loss.*", "student.embeddings.*"],
    }
    recipe = execute(DistillRecursiveRecipe(OmegaConf.create(cfg)))
    assert sorted(recipe.loss_fn.projections) == ["0", "1", "2"]
    assert [w.shape for w in (p.weight for p in recipe.loss_fn.projections.values())] == [(48, 64)] * 3
    assert isinstance(load_student(str(tmp_path / "run" / "student")), BottleneckEncoder)
