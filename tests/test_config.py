"""Config checking: unknown keys, wrong types and bad builder arguments fail before any work."""

import pytest
from omegaconf import OmegaConf

from components.config import check_config, ConfigError
from components.training.schema import DistillConfig

BASE = {
    "output_dir": "out",
    "teacher": {"_component_": "components.checkpointing.hf_teacher", "path": "some/teacher"},
    "student": {"_component_": "components.models.minialbert_128"},
    "data": {"source": "corpus.txt"},
}


def check(**changes):
    cfg = OmegaConf.merge(OmegaConf.create(BASE), OmegaConf.from_dotlist([f"{k}={v}" for k, v in changes.items()]))
    return check_config(cfg, DistillConfig)


def test_defaults_are_filled_in():
    cfg = check()
    assert cfg.max_steps is None and cfg.save_every_n_steps is None and cfg.resume_from_checkpoint is False
    assert cfg.optimizer._component_ == "torch.optim.AdamW" and cfg.optimizer.lr == 5e-4
    assert cfg.data.max_length == 256 and cfg.data.stride == 128 and cfg.data.mlm_probability == 0.15


@pytest.mark.parametrize(
    "change, message",
    [
        ({"max_step": 10}, r"Unknown config key 'max_step' \(did you mean 'max_steps'\?\)"),
        ({"data.strde": 3}, r"Unknown config key 'strde' in section 'data' \(did you mean 'stride'\?\)"),
        (
            {"student.hiden_size": 3},
            r"'student.hiden_size'.*has no argument 'hiden_size' \(did you mean 'hidden_size'\?\)",
        ),
        ({"max_steps": "ten"}, r"'max_steps' must be int or null, got str 'ten'"),
        ({"data.batch_size": 2.5}, r"'data.batch_size' must be int, got float 2.5"),
        (
            {"dtype": "fp16"},
            r"'dtype' must be one of \['auto', 'fp32', 'bf16'\], got str 'fp16': fp16 is not offered.*use dtype=bf16",
        ),
        ({"student.num_iterations": "six"}, r"'student.num_iterations' must be int, got str 'six'"),
        (
            {"loss._component_": "components.losses.NoSuchLoss"},
            r"loss._component_: cannot import 'components.losses.NoSuchLoss'",
        ),
        (
            {"stages": "[{name: a, stepz: 3}]"},
            r"Unknown config key 'stepz' in section 'stages\[0\]' \(did you mean 'steps'\?\)",
        ),
    ],
)
def test_bad_configs_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        check(**change)


def test_missing_required_sections():
    with pytest.raises(ConfigError, match="missing the required key 'teacher'"):
        check_config(OmegaConf.create({k: v for k, v in BASE.items() if k != "teacher"}), DistillConfig)
    with pytest.raises(ConfigError, match="'teacher' is missing the required argument 'path'"):
        check_config(
            OmegaConf.create({**BASE, "teacher": {"_component_": "components.checkpointing.hf_teacher"}}), DistillConfig
        )


def test_every_shipped_config_is_valid(monkeypatch):
    from components.training.schema import ExportConfig, FinetuneConfig
    from components.training.stages import expand_stages
    from tests.helpers import REPO

    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {
        "tiny.yaml",
        "tiny_qat.yaml",
        "bert_base.yaml",
        "bert_base_qat.yaml",
        "bert_large.yaml",
        "export_int8.yaml",
        "finetune_tiny.yaml",
        "glue_sst2.yaml",
        "glue_mrpc.yaml",
        "glue_stsb.yaml",
        "ner_conll.yaml",
        "embedding_teacher.yaml",
        "eval_tiny.yaml",
    }
    monkeypatch.chdir(REPO)  # an evaluation suite names fine-tuning configs from the repository root
    for path in configs:
        if path.name.startswith("eval"):  # recipes/evaluate.py: every task's config is read and checked too
            from recipes.evaluate import EvaluateRecipe

            recipe = EvaluateRecipe(OmegaConf.load(path))
            assert recipe.tasks
            continue
        if path.name.startswith("export"):  # recipes/export_student.py: the folders come from the command line
            check_config(
                OmegaConf.merge(OmegaConf.load(path), {"checkpoint_dir": "s", "output_dir": "o"}), ExportConfig
            )
            continue
        schema = FinetuneConfig if path.name.startswith(("finetune", "glue", "ner")) else DistillConfig
        cfg = check_config(expand_stages(OmegaConf.load(path)), schema)
        keys = (
            ("output_dir", "checkpoint_dir", "tuning", "max_steps")
            if schema is FinetuneConfig
            else ("output_dir", "max_steps", "save_every_n_steps")
        )
        for key in keys + ("resume_from_checkpoint",):
            assert key in OmegaConf.load(path), f"{path.name} does not set {key}"
        assert cfg.resume_from_checkpoint is False


@pytest.mark.parametrize(
    "change, message",
    [
        ({"loss.weights": "{hiden: 3}"}, r"'loss.weights' must be"),
        ({"loss.hidden_metric": "cos"}, r"'loss.hidden_metric' must be one of \['cosine', 'mse'\]"),
        ({"loss.layer_map": "unifrom"}, r"'loss.layer_map' must be"),
        ({"data.stride": 0}, r"'data.stride' must be at least 1, got 0"),
        ({"data.batch_size": 0}, r"'data.batch_size' must be at least 1"),
        ({"gradient_accumulation_steps": 0}, r"'gradient_accumulation_steps' must be at least 1"),
        ({"log_every_n_steps": 0}, r"'log_every_n_steps' must be at least 1"),
        ({"data.mlm_probability": 1.0}, r"'data.mlm_probability' must be at least 0.0 and below 1.0"),
        ({"stages": "[{loss_weights: {hiden: 1}}]"}, r"'stages\[0\].loss_weights' must be"),
        ({"stages": "[{steps: 0}]"}, r"'stages\[0\].steps' must be at least 1"),
    ],
)
def test_bad_values_fail_before_anything_loads(change, message):
    with pytest.raises(ConfigError, match=message):
        check(**change)


def test_a_component_section_without_component_keeps_the_default():
    cfg = check(**{"loss.temperature": 2.0, "optimizer.lr": 1e-3})
    assert cfg.loss._component_ == "components.losses.DistillationLoss" and cfg.loss.temperature == 2.0
    assert (
        cfg.optimizer._component_ == "torch.optim.AdamW"
        and cfg.optimizer.lr == 1e-3
        and cfg.optimizer.weight_decay == 1e-4
    )
