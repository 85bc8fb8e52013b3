"""Config checking: unknown keys, wrong types and bad builder arguments fail before any work."""

import pytest
from omegaconf import OmegaConf

from components.training.config import check_config, ConfigError
from components.training.schema import DistillConfig

BASE = {
    "output_dir": "out",
    "teacher": {"_component_": "components.models.hf_teacher", "path": "some/teacher"},
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
        ({"student.hiden_size": 3}, r"'student.hiden_size'.*has no argument 'hiden_size' \(did you mean 'hidden_size'\?\)"),
        ({"max_steps": "ten"}, r"'max_steps' must be int or null, got str 'ten'"),
        ({"data.batch_size": 2.5}, r"'data.batch_size' must be int, got float 2.5"),
        ({"dtype": "fp16"}, r"'dtype' must be one of \['fp32', 'bf16'\], got str 'fp16'"),
        ({"student.num_iterations": "six"}, r"'student.num_iterations' must be int, got str 'six'"),
        ({"loss._component_": "components.losses.NoSuchLoss"}, r"loss._component_: cannot import 'components.losses.NoSuchLoss'"),
        ({"stages": "[{name: a, stepz: 3}]"}, r"Unknown config key 'stepz' in section 'stages\[0\]' \(did you mean 'steps'\?\)"),
    ],
)
def test_bad_configs_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        check(**change)


def test_missing_required_sections():
    with pytest.raises(ConfigError, match="missing the required key 'teacher'"):
        check_config(OmegaConf.create({k: v for k, v in BASE.items() if k != "teacher"}), DistillConfig)
    with pytest.raises(ConfigError, match="'teacher' is missing the required argument 'path'"):
        check_config(OmegaConf.create({**BASE, "teacher": {"_component_": "components.models.hf_teacher"}}), DistillConfig)


def test_every_shipped_config_is_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"tiny.yaml", "bert_base.yaml", "bert_large.yaml"}
    for path in configs:
        cfg = check_config(OmegaConf.load(path), DistillConfig)
        for key in ("output_dir", "max_steps", "save_every_n_steps", "resume_from_checkpoint"):
            assert key in OmegaConf.load(path), f"{path.name} does not set {key}"
        assert cfg.resume_from_checkpoint is False
