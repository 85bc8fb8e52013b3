"""Every key of a distillation config, its type and default (the README's key table mirrors
this file). Checked by :func:`components.training.config.check_config` before a run starts."""

from dataclasses import dataclass
from typing import Any, List, Literal, Optional

from components.training.config import Component, component_field
from components.training.stages import StageConfig


@dataclass
class DataConfig:
    # Local .txt/.jsonl/.json/.parquet files (paths, folders, globs), a Hub dataset name,
    # or a _component_ returning either.
    source: Any
    text_column: str = "text"  # column with the text in .jsonl/.parquet/Hub data
    hub_config: Optional[str] = None  # configuration name of a Hub dataset
    split: str = "train"  # split of a Hub dataset
    sample_by: Literal["paragraph", "line", "document"] = "paragraph"  # documents in .txt
    max_length: int = 256  # tokens per window, special tokens included
    stride: int = 128  # tokens between the starts of consecutive windows of a document
    mlm_probability: float = 0.15
    batch_size: int = 32  # windows per micro-batch (per device)
    eval_fraction: float = 0.01  # share of documents held out for evaluation (0: none)
    max_eval_windows: int = 1024
    pad_to_multiple_of: int = 8
    num_proc: Optional[int] = None  # processes for tokenisation


@dataclass
class DistillConfig:
    output_dir: str
    teacher: Component = component_field()
    student: Component = component_field(provided=("vocab_size", "pad_token_id"))
    data: DataConfig
    loss: Component = component_field(
        {"_component_": "components.losses.DistillationLoss"}, provided=("student", "teacher")
    )
    optimizer: Component = component_field(
        {"_component_": "torch.optim.AdamW", "lr": 5e-4, "weight_decay": 1e-4}, provided=("params",)
    )
    lr_schedule: Component = component_field(
        {"_component_": "components.training.linear_warmup_decay", "warmup_steps": 0},
        provided=("total_steps",),
    )
    # Stages of the run in order; null: one stage training everything with loss.weights.
    stages: Optional[List[StageConfig]] = None
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast where the device supports it
    max_steps: Optional[int] = None  # total optimizer steps; overrides epochs
    epochs: int = 1
    gradient_accumulation_steps: int = 1
    clip_grad_norm: Optional[float] = 1.0
    log_every_n_steps: int = 10
    eval_every_n_steps: Optional[int] = None  # null: evaluate at the end only
    save_every_n_steps: Optional[int] = None  # null: checkpoint at the end only
    keep_last_n_checkpoints: int = 2
    resume_from_checkpoint: bool = False
    enable_activation_checkpointing: bool = False
    compile: bool = False
