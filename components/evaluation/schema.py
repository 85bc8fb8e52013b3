"""recipes/evaluate.py's config: the models, the tasks and how each is scored."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from components.config import bounded, Component

TASK_KINDS = ("finetune", "probe", "similarity")


@dataclass
class EvalTaskConfig:
    """One task of an evaluation suite (``tasks.<name>``): one column group of the table."""

    # finetune: recipes/finetune.py trains each model (every tuning x lr x seed); probe: a linear
    # model on frozen mean-pooled features (logistic regression, ridge for regression);
    # similarity: cosine of mean-pooled sentence embeddings against gold scores (pairs), zero-shot
    kind: Literal[TASK_KINDS]
    # A fine-tuning config file (configs/glue_sst2.yaml...) the task starts from; its output_dir
    # and checkpoint_dir are replaced. probe and similarity read only its data and task sections.
    config: Optional[str] = None
    # Fine-tuning config keys over the file's (and over finetune_defaults), as a nested mapping:
    # {epochs: 3, data: {source: ..., batch_size: 16}, task: {type: classification}}
    overrides: Dict[str, Any] = field(default_factory=dict)
    tuning: List[Literal["full", "adapters", "head"]] = field(default_factory=lambda: ["full"])  # finetune
    lrs: Optional[List[float]] = None  # finetune: learning-rate grid (best by mean over seeds); null: the config's
    seeds: List[int] = field(default_factory=lambda: [42])  # finetune: one run per seed; mean and standard error
    # The reported metric; null: the fine-tuning task.metric (finetune), else accuracy / pearson
    # for probes, spearman for similarity
    metric: Optional[str] = None
    split: str = "validation"  # probe and similarity: the split scored (probes fit on train)
    probe_c: float = bounded(0.01, low=1e-12)  # probe: inverse L2 strength (logistic regression; ridge alpha = 1/C)
    max_train_rows: Optional[int] = bounded(None, low=2)  # probe: use the first N train rows only


@dataclass
class LatencyConfig:
    shapes: List[List[int]] = field(default_factory=lambda: [[1, 128], [8, 128]])  # [batch, seq] pairs
    warmup: int = bounded(3, low=0)
    repeats: int = bounded(10, low=1)  # the median of these is reported


@dataclass
class EvaluateConfig:
    """recipes/evaluate.py: models x tasks -> results.json, report.md, report.png."""

    output_dir: str  # everything goes here; a rerun continues from the finished cells
    # name -> a student folder, a fine-tuning base, a Hub id or folder of a BERT-family checkpoint, or
    # an int8 export folder (export.json + model.onnx, run by ONNX Runtime). `name: null` drops a name.
    models: Dict[str, Optional[str]]
    tasks: Dict[str, Any]  # name -> a task (keys below: EvalTaskConfig); a column group of the table
    reference: Optional[str] = None  # the model every figure is also given as a percentage of (the teacher)
    # Fine-tuning config keys every finetune task starts from (below its config file and overrides)
    finetune_defaults: Dict[str, Any] = field(default_factory=dict)
    device: str = "auto"  # auto | cpu | cuda | cuda:N: fine-tuning, features and torch latency
    # fine-tuning cells: fp32 | bf16 | auto (as in fine-tuning); features and latency are fp32
    dtype: Literal["auto", "fp32", "bf16"] = "fp32"
    batch_size: int = bounded(64, low=1)  # rows per feature batch (probe, similarity)
    latency: LatencyConfig = field(default_factory=dict)  # CPU (and CUDA) latency per model (keys below)
    # Dashboard for each finished cell's scores: null is TensorBoard under <output_dir>/tensorboard,
    # or any torchtune metric logger. metrics.jsonl is written either way.
    metric_logger: Optional[Component] = None
