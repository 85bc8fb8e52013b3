"""Build small distillation configs and run the recipe in-process."""

import json
from pathlib import Path
from typing import Dict

from omegaconf import OmegaConf

from components.config import override

DISTILLED = {"max_steps": 4, "save_every_n_steps": None}
"""The session's shared run (conftest's ``distilled_run``): ``tiny_config(out, teacher_dir, corpus_file, **DISTILLED)``."""


def tiny_config(output_dir: Path, teacher_dir: Path, corpus: Path, **overrides) -> Dict:
    cfg = {
        "output_dir": str(output_dir),
        "seed": 0,
        "teacher": {"_component_": "components.checkpointing.hf_teacher", "path": str(teacher_dir)},
        "student": {"_component_": "components.models.recursive_tiny", "max_position_embeddings": 80},
        "data": {
            "source": str(corpus),
            "max_length": 32,
            "stride": 16,
            "batch_size": 8,
            "eval_fraction": 0.1,
            "max_eval_windows": 32,
        },
        "loss": {"_component_": "components.losses.DistillationLoss"},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 1e-4},
        "lr_schedule": {"_component_": "components.training.linear_warmup_decay", "warmup_steps": 1},
        "max_steps": 6,
        "log_every_n_steps": 1,
        "save_every_n_steps": 3,
        "resume_from_checkpoint": False,
    }
    return override(cfg, overrides)


def run_recipe(cfg: Dict):
    from components.training.run import execute
    from recipes.distill_recursive import DistillRecursiveRecipe

    return execute(DistillRecursiveRecipe(OmegaConf.create(cfg)))


def logged(output_dir: Path) -> Dict[int, Dict]:
    """The metrics.jsonl records by step (the last line of a step wins)."""
    records: Dict[int, Dict] = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record["step"], {}).update(record)
    return records


def run_export(checkpoint_dir: Path, output_dir: Path, **overrides) -> Dict:
    """The export recipe in-process, on a small held-out batch; returns its report."""
    from recipes.export_student import export

    cfg = {"checkpoint_dir": str(checkpoint_dir), "output_dir": str(output_dir), "eval_batch_size": 4,
           "eval_max_length": 48, **overrides}  # fmt: skip
    return export(OmegaConf.create(cfg))
