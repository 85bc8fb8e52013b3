"""The single-device recipe in-process: resume equivalence, stages, bad input."""

import math
import shutil

import pytest
import torch

from components.checkpointing import load_student
from components.checkpointing.resume import list_checkpoints, load_checkpoint
from components.config import ConfigError
from components.training.distill import NonFiniteLossError
from tests.helpers import make_hf_teacher
from tests.recipe_helpers import DISTILLED, logged, run_recipe, tiny_config


def test_resumed_run_reproduces_the_uninterrupted_one(tmp_path, teacher_dir, corpus_file):
    # dropout stays on (0.1): the resumed run must also restore the random state
    straight = tmp_path / "straight"
    run_recipe(tiny_config(straight, teacher_dir, corpus_file))
    assert [p.name for p in list_checkpoints(straight)] == ["step_00000003", "step_00000006"]

    # a run that died right after its step-3 checkpoint
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    recipe = run_recipe(tiny_config(resumed, teacher_dir, corpus_file, resume_from_checkpoint=True))
    assert recipe.step == 6

    a, b = logged(straight), logged(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss/total", "loss/mlm", "loss/output", "loss/hidden", "loss/attention", "grad_norm", "lr"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-9), (step, key)
    first, second = load_student(str(straight / "student")), load_student(str(resumed / "student"))
    for (name, x), (_, y) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-7), name
    assert (resumed / "tensorboard").is_dir()


def test_run_outputs_and_falling_loss(tmp_path, teacher_dir, corpus_file):
    out = tmp_path / "run"
    recipe = run_recipe(
        tiny_config(out, teacher_dir, corpus_file, max_steps=30, save_every_n_steps=None, **{"optimizer.lr": 3e-3})
    )
    records = logged(out)
    early = sum(records[s]["loss/total"] for s in (1, 2, 3)) / 3
    late = sum(records[s]["loss/total"] for s in (28, 29, 30)) / 3
    assert late < 0.8 * early
    assert {"eval/student_mlm_loss", "eval/teacher_mlm_accuracy", "eval/alignment_cosine/student_1_teacher_2"} <= set(
        records[30]
    )
    assert [p.name for p in list_checkpoints(out)] == ["step_00000030"]  # the final one
    assert (out / "config.yaml").is_file()
    student = load_student(str(out / "student"))
    assert student.spec.vocab_size == recipe.teacher.spec.vocab_size
    assert (out / "student" / "tokenizer.json").is_file()


def test_stages_freeze_and_scale_what_they_say(tmp_path, teacher_dir, corpus_file):
    stages = [
        # adapters only, hidden loss only, shared layer frozen
        {
            "name": "adapters",
            "steps": 2,
            "loss_weights": {"hidden": 1.0},
            "trainable": ["student.adapters.*", "loss.*"],
        },
        # everything trains, but the embeddings at learning rate 0
        {"name": "all", "lr_scale": {"student.embeddings.*": 0.0}},
    ]
    cfg = tiny_config(tmp_path / "run", teacher_dir, corpus_file, max_steps=4, save_every_n_steps=2, stages=stages)
    from omegaconf import OmegaConf

    from recipes.distill_recursive import DistillRecursiveRecipe

    fresh = DistillRecursiveRecipe(OmegaConf.create({**cfg, "output_dir": str(tmp_path / "fresh")}))
    fresh.setup()
    initial = {k: v.clone() for k, v in fresh.student.state_dict().items()}
    fresh.cleanup()

    run_recipe(cfg)

    def student_state(step):
        state = load_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{step:08d}")["model"]
        return {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}

    after_stage_1, final = student_state(2), student_state(4)
    assert torch.equal(after_stage_1["layer.ffn_in.weight"], initial["layer.ffn_in.weight"])
    assert torch.equal(after_stage_1["mlm_head.decoder.weight"], initial["mlm_head.decoder.weight"])
    assert not torch.equal(after_stage_1["adapters.0.ffn_in.down.weight"], initial["adapters.0.ffn_in.down.weight"])
    assert not torch.equal(final["layer.ffn_in.weight"], initial["layer.ffn_in.weight"])
    assert torch.equal(final["embeddings.word_embeddings.weight"], initial["embeddings.word_embeddings.weight"])
    records = logged(tmp_path / "run")
    assert set(k for k in records[1] if k.startswith("loss/")) == {"loss/total", "loss/hidden"}
    assert "loss/output" in records[3] and records[3]["stage"] == 1.0


def test_student_vocabulary_must_match_the_teacher(tmp_path, teacher_dir, corpus_file):
    cfg = tiny_config(tmp_path / "run", teacher_dir, corpus_file, **{"student.vocab_size": 301})
    with pytest.raises(
        ConfigError, match=r"student vocabulary \(301, student.vocab_size\) differs from the teacher's \(300"
    ):
        run_recipe(cfg)


def test_a_finished_output_dir_is_not_overwritten(tmp_path, teacher_dir, corpus_file, distilled_run):
    shutil.copytree(distilled_run, tmp_path / "run")  # a finished run, and the config that ran it
    cfg = tiny_config(tmp_path / "run", teacher_dir, corpus_file, **DISTILLED)
    before = (tmp_path / "run" / "student" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run. Continue it with resume_from_checkpoint=True"):
        run_recipe(cfg)
    assert (tmp_path / "run" / "student" / "model.safetensors").read_bytes() == before


def test_teacher_without_mlm_head(tmp_path, tokenizer, corpus_file):
    teacher = make_hf_teacher(tmp_path / "plain", tokenizer, kind="bert-no-head")
    with pytest.raises(ValueError, match="teacher has no MLM head"):
        run_recipe(tiny_config(tmp_path / "a", teacher, corpus_file, max_steps=2))
    weights = {"mlm": 1.0, "hidden": 3.0, "attention": 3.0}
    run_recipe(tiny_config(tmp_path / "b", teacher, corpus_file, max_steps=2, **{"loss.weights": weights}))
    assert set(k for k in logged(tmp_path / "b")[2] if k.startswith("loss/")) == {
        "loss/total",
        "loss/mlm",
        "loss/hidden",
        "loss/attention",
    }


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, teacher_dir, corpus_file, monkeypatch):
    from components.losses import DistillationLoss

    original = DistillationLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 3:  # steps 1-3 are fine (one micro-batch each)
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(DistillationLoss, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 4.*checkpoint of step 3 is kept"):
        run_recipe(tiny_config(out, teacher_dir, corpus_file))
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003"]
    assert load_checkpoint(list_checkpoints(out)[0])["step"] == 3
    assert not (out / "student").exists()


def test_bf16_autocast_run(tmp_path, teacher_dir, corpus_file):
    out = tmp_path / "bf16"
    run_recipe(
        tiny_config(out, teacher_dir, corpus_file, dtype="bf16", max_steps=3, enable_activation_checkpointing=True)
    )
    records = logged(out)
    assert all(torch.isfinite(torch.tensor(records[s]["loss/total"])) for s in (1, 2, 3))
    assert load_student(str(out / "student")).embeddings.word_embeddings.weight.dtype == torch.float32


def test_no_held_out_windows_still_exports(tmp_path, teacher_dir, corpus_file):
    out = tmp_path / "run"
    run_recipe(tiny_config(out, teacher_dir, corpus_file, max_steps=3, **{"data.max_eval_windows": 0}))
    assert (out / "student" / "model.safetensors").is_file()
    assert not any(k.startswith("eval/") for record in logged(out).values() for k in record)


def test_stage_globs_that_match_nothing_fail_before_the_data_loads(tmp_path, teacher_dir, corpus_file):
    stages = [{"steps": 2, "trainable": ["student.adapter.*"]}, {"name": "rest"}]
    cfg = tiny_config(
        tmp_path / "run", teacher_dir, corpus_file, stages=stages, **{"data.source": str(tmp_path / "absent.txt")}
    )
    with pytest.raises(ConfigError, match=r"stages: stages\[0\].trainable: 'student.adapter.\*' matches no parameter"):
        run_recipe(cfg)


def test_warmup_longer_than_the_run_is_shortened_loudly(tmp_path, teacher_dir, corpus_file, caplog):
    cfg = tiny_config(tmp_path / "run", teacher_dir, corpus_file, max_steps=20, **{"lr_schedule.warmup_steps": 50})
    with caplog.at_level("WARNING"):
        run_recipe(cfg)
    assert "warmup_steps=50 is not below the run's 20 steps" in caplog.text and "over 2 steps instead" in caplog.text
    records = logged(tmp_path / "run")
    assert records[2]["lr"] == pytest.approx(1e-3) and records[20]["lr"] < records[2]["lr"]


def test_padding_never_exceeds_the_position_limit(tmp_path, teacher_dir, corpus_file):
    cfg = tiny_config(
        tmp_path / "run",
        teacher_dir,
        corpus_file,
        max_steps=2,
        **{"student.max_position_embeddings": 37, "data.max_length": 37},
    )
    run_recipe(cfg)  # windows of 37 would pad to 40 without the cap


def test_logged_lr_includes_the_stage_scale(tmp_path, teacher_dir, corpus_file):
    stages = [{"steps": 2, "lr_scale": {"*": 0.5}}, {"name": "rest"}]
    cfg = tiny_config(
        tmp_path / "run", teacher_dir, corpus_file, max_steps=4, stages=stages, **{"lr_schedule.warmup_steps": 0}
    )
    run_recipe(cfg)
    records = logged(tmp_path / "run")
    assert records[1]["lr"] == pytest.approx(0.5e-3) and records[3]["lr"] == pytest.approx(1e-3 * 0.5)


def test_continuing_from_a_saved_student(tmp_path, teacher_dir, corpus_file, distilled_student):
    cfg = tiny_config(tmp_path / "second", teacher_dir, corpus_file, max_steps=2)
    cfg["student"] = {"_component_": "components.checkpointing.load_student", "path": str(distilled_student)}
    run_recipe(cfg)  # same vocabulary: fine. A student of another vocabulary is refused:
    from components.checkpointing import save_student
    from components.models import recursive_tiny

    save_student(recursive_tiny(vocab_size=400), tmp_path / "wrong_vocab")
    cfg = tiny_config(tmp_path / "third", teacher_dir, corpus_file, max_steps=2)
    cfg["student"] = {"_component_": "components.checkpointing.load_student", "path": str(tmp_path / "wrong_vocab")}
    with pytest.raises(ConfigError, match=r"student vocabulary \(400"):
        run_recipe(cfg)


def test_resuming_with_other_data_settings_is_refused(tmp_path, teacher_dir, corpus_file, caplog, distilled_run):
    out = tmp_path / "run"
    shutil.copytree(distilled_run, out)  # a finished run of 4 steps, checkpoint at step 4
    with pytest.raises(ConfigError, match=r"different data.batch_size \(8, now 4\)"):
        run_recipe(
            tiny_config(
                out, teacher_dir, corpus_file, max_steps=6, resume_from_checkpoint=True, **{"data.batch_size": 4}
            )
        )
    with caplog.at_level("WARNING"):
        run_recipe(
            tiny_config(
                out, teacher_dir, corpus_file, max_steps=6, resume_from_checkpoint=True, **{"optimizer.lr": 5e-4}
            )
        )
    assert "Resuming with optimizer.lr changed: 0.001 in the checkpoint, 0.0005 now" in caplog.text


def test_no_masking_for_hidden_state_and_attention_distillation(tmp_path, teacher_dir, corpus_file):
    only_layers = {"mlm": 0, "output": 0, "hidden": 3, "attention": 3}
    cfg = tiny_config(
        tmp_path / "run",
        teacher_dir,
        corpus_file,
        max_steps=2,
        **{"data.mlm_probability": 0.0, "loss.weights": only_layers},
    )
    recipe = run_recipe(cfg)
    batch = recipe.step_batches(step=0)[0]
    assert not batch.masked_positions.any()  # both models see the text as it is
    records = logged(tmp_path / "run")
    assert all(math.isfinite(records[s]["loss/total"]) for s in (1, 2))
    assert "eval/alignment_cosine/student_2_teacher_4" in records[2] and "eval/student_mlm_loss" not in records[2]
    # a term that reads masked positions cannot work without masks: refused before anything runs
    cfg = tiny_config(tmp_path / "other", teacher_dir, corpus_file, max_steps=2, **{"data.mlm_probability": 0.0})
    with pytest.raises(
        ConfigError, match=r"data.mlm_probability=0 masks no token, but 'the run' weights the mlm and output term"
    ):
        run_recipe(cfg)
    assert not (tmp_path / "other" / "checkpoints").exists()


def test_init_from_teacher_starts_the_shared_layer_and_embeddings_from_the_teacher(tmp_path, teacher_dir, corpus_file):
    from omegaconf import OmegaConf

    from recipes.distill_recursive import DistillRecursiveRecipe

    cfg = tiny_config(
        tmp_path / "run",
        teacher_dir,
        corpus_file,
        **{
            "student.hidden_size": 32,  # the teacher's shapes: width 32, 4 heads, FFN 64
            "student.intermediate_size": 64,
            "student.embedding_size": 16,
            "init_from_teacher": {"layer": 4, "embeddings": True},
        },
    )
    recipe = DistillRecursiveRecipe(OmegaConf.create(cfg))
    recipe.setup()
    try:
        teacher = recipe.teacher.encoder
        for k, v in teacher.layers[3].state_dict().items():
            assert torch.equal(recipe.student.layer.state_dict()[k], v), k
        # the student's factorised word embeddings, projected, are a rank-16 fit of the teacher's
        word = recipe.student.embeddings.word_embeddings.weight @ recipe.student.projector.weight.T
        error = torch.linalg.norm(word - teacher.embeddings.word_embeddings.weight)
        assert error < 0.9 * torch.linalg.norm(teacher.embeddings.word_embeddings.weight)
    finally:
        recipe.cleanup()
