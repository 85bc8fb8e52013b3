"""Every key of each recipe's config, its type, default and meaning (the docs' config reference
is generated from this file), checked by ``components.config.check_config`` before a run
starts; and, at the end, the checks across keys that need the built models."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

from components.config import bounded, Component, component_field, config_section
from components.errors import ConfigError
from components.models.adapters import FRESH_PLACEMENTS, takes_adapters
from components.quantization.schemes import SCHEME_NAMES
from components.training.stages import check_stage_patterns, StageConfig


@dataclass
class DataConfig:
    # Local .txt/.jsonl/.json/.parquet files (paths, folders, globs), a Hub dataset name,
    # or a _component_ returning either.
    source: Any
    text_column: str = "text"  # column with the text in .jsonl/.parquet/Hub data
    hub_config: Optional[str] = None  # configuration name of a Hub dataset
    split: str = "train"  # split of a Hub dataset
    # documents in .txt; a file with no blank line in its first MiB is read by line (warned)
    sample_by: Literal["paragraph", "line", "document"] = "paragraph"
    # .txt bytes that are not UTF-8: "strict" stops naming file/line, "replace" uses U+FFFD
    encoding_errors: Literal["strict", "replace"] = "strict"
    max_length: int = bounded(256, low=8)  # tokens per window, special tokens included
    stride: int = bounded(128, low=1)  # tokens between the starts of consecutive windows of a document
    # share of tokens masked; 0 (no masking) only when no stage weights the mlm or output term
    mlm_probability: float = bounded(0.15, low=0.0, high=1.0, high_open=True)
    batch_size: int = bounded(32, low=1)  # windows per micro-batch (per device)
    eval_fraction: float = bounded(0.01, low=0.0, high=1.0, high_open=True)  # share of documents held out (0: none)
    max_eval_windows: int = bounded(1024, low=0)  # cap on held-out windows
    pad_to_multiple_of: int = bounded(8, low=1)  # pad each batch's length to a multiple of this
    # several windows per row with block-diagonal attention (same losses, less padding: for
    # short sentences); not with attention_reduction=element or a trigram-input student
    pack: bool = False
    num_proc: Optional[int] = bounded(None, low=1)  # processes datasets reads the corpus files with


@dataclass
class QuantizationConfig:
    # The deployed scheme that stages with fake_quantize: true train for (docs: quantisation and
    # export): int8_dynamic (ONNX Runtime dynamic int8), int8_weight, int4_weight.
    scheme: Literal[SCHEME_NAMES] = "int8_dynamic"
    group_size: int = bounded(32, low=2)  # int4_weight: inputs sharing one scale


@dataclass
class InitFromTeacherConfig:
    # the 1-based teacher layer whose weights start a recursive student's shared layer (null: none)
    layer: Optional[int] = bounded(None, low=1)
    # the teacher's embedding tables factorised to the student's width E by a truncated SVD
    embeddings: bool = False


@dataclass
class DistillConfig:
    """recipes/distill_recursive.py (and _distributed.py): a teacher distilled into a student."""

    output_dir: str  # everything the run writes goes here (locked while it runs)
    # components.checkpointing.hf_teacher with path (a Hub id or a folder), revision, dtype (fp32 or bf16)
    teacher: Component = component_field()
    # a student builder (components.models.minialbert_128, recursive_tiny, mobilebert, ...) or
    # components.checkpointing.load_student with path; vocab_size and pad_token_id come from the teacher
    student: Component = component_field(provided=("vocab_size", "pad_token_id"))
    data: DataConfig  # the corpus and how it is cut into windows (keys below)
    # components.losses.DistillationLoss: weights per term, temperature, layer_map, hidden_metric,
    # attention_reduction, projection (docs: distillation)
    loss: Component = component_field(
        {"_component_": "components.losses.DistillationLoss"}, provided=("student", "teacher")
    )
    # any torch.optim optimizer with its arguments; biases and norm weights are never decayed
    optimizer: Component = component_field(
        {"_component_": "torch.optim.AdamW", "lr": 5e-4, "weight_decay": 1e-4}, provided=("params",)
    )
    # the learning-rate multiplier by step: linear_warmup_decay or cosine_warmup_decay (warmup_steps, final_ratio)
    lr_schedule: Component = component_field(
        {"_component_": "components.training.linear_warmup_decay", "warmup_steps": 0},
        provided=("total_steps",),
    )
    # Stages of the run in order; null: one stage training everything with loss.weights.
    # A stage-list builder may stand here instead (stages: {_component_: components.training.progressive_stages, ...}).
    stages: Optional[List[StageConfig]] = None
    # Start the student's embeddings from the teacher's wherever name and shape agree (MobileBERT)
    copy_teacher_embeddings: bool = False
    # Start a recursive student from its teacher's weights (docs: distillation)
    init_from_teacher: InitFromTeacherConfig = field(default_factory=dict)
    quantization: QuantizationConfig = field(default_factory=dict)  # what QAT stages train for (keys below)
    seed: int = 42  # seeds initialisation, data order and masking
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # fp32 | bf16: autocast (losses and attention softmax stay fp32) | auto: bf16 where the device
    # computes it natively (CUDA with bf16, CPUs with AVX512_BF16 / AMX / ARM BF16), fp32 elsewhere
    dtype: Literal["auto", "fp32", "bf16"] = "fp32"
    max_steps: Optional[int] = bounded(None, low=1)  # total optimizer steps; overrides epochs
    epochs: int = bounded(1, low=1)  # passes over the training windows, when max_steps is null
    gradient_accumulation_steps: int = bounded(1, low=1)  # micro-batches per optimizer step
    clip_grad_norm: Optional[float] = bounded(1.0, low=0.0)  # null: log the norm without clipping
    log_every_n_steps: int = bounded(10, low=1)  # metrics.jsonl and the dashboard
    eval_every_n_steps: Optional[int] = bounded(None, low=1)  # null: evaluate at the end only
    save_every_n_steps: Optional[int] = bounded(None, low=1)  # null: checkpoint at the end only
    keep_last_n_checkpoints: int = bounded(2, low=0)  # 0: keep all
    resume_from_checkpoint: bool = False  # continue from the newest usable checkpoint in output_dir
    # A checkpoint records the corpus's and the teacher's fingerprints; a resume on changed ones
    # is refused unless named here: [data], [teacher] or both.
    allow_changes_on_resume: List[Literal["data", "teacher"]] = field(default_factory=list)
    enable_activation_checkpointing: bool = False  # recompute each iteration in the backward pass
    compile: bool = False  # torch.compile the student and the teacher's layers
    # Dashboard for the logged scalars: null is TensorBoard under <output_dir>/tensorboard; or any
    # torchtune metric logger (torchtune.training.metric_logging.DiskLogger, WandBLogger,
    # MLFlowLogger...) with its arguments. metrics.jsonl is written either way.
    metric_logger: Optional[Component] = None
    # torchtune.training.setup_torch_profiler with its arguments (enabled, wait_steps,
    # warmup_steps, active_steps, ...); traces go to <output_dir>/profiling unless output_dir is set
    profiler: Optional[Component] = None
    log_peak_memory_stats: bool = True  # peak CUDA memory at every logged step (CUDA only)


@dataclass
class ExportConfig:
    """recipes/export_student.py: a student folder -> model.onnx + model.pt2 + export.json."""

    checkpoint_dir: str  # a student folder written by this library (native or ALBERT format)
    output_dir: str  # written atomically; must be new or empty, or hold an export and overwrite=True
    # null: the scheme the student was trained for (its QAT stages), else int8_dynamic
    scheme: Optional[Literal[SCHEME_NAMES]] = None
    group_size: Optional[int] = bounded(None, low=2)  # int4_weight; null: as trained, else 32
    # A student trained quantisation-aware for one scheme and group size exports at exactly those:
    # another scheme or group_size is refused, naming both, unless requantize=true asks for
    # post-training re-quantisation at the asked settings (exported with a warning). A plain fp32
    # student is always quantised post-training, at any scheme.
    requantize: bool = False
    overwrite: bool = False  # replace an earlier export in output_dir
    # Text for the held-out batch the files are measured on: local .txt/.jsonl/.parquet files or
    # a Hub dataset (as data.source in distillation); null: this Python's stdlib docstrings.
    eval_source: Optional[Any] = None
    eval_text_column: str = "text"  # the column holding text in .jsonl/.parquet/Hub data
    eval_batch_size: int = bounded(8, low=2)  # texts in the held-out batch
    eval_max_length: int = bounded(128, low=8)  # tokens per text, at most the student's positions


@dataclass
class TaskConfig:
    """recipes/finetune.py's ``task`` section: what is predicted and how it is scored."""

    # classification and regression of sentences (or pairs); token_classification: NER
    type: Literal["classification", "regression", "token_classification"] = "classification"
    input: Literal["single", "pair"] = "single"  # one text column, or sentence pairs
    labels: Optional[List[str]] = None  # label names in id order; null: from the data
    metric: Optional[str] = None  # the metric that picks the best checkpoint; null: DEFAULT_METRIC[type]


@dataclass
class TaskDataConfig:
    """recipes/finetune.py's ``data`` section: where the task's splits come from and how they are read."""

    # A Hub dataset name ("glue", "eriktks/conll2003"), a local folder written by datasets'
    # save_to_disk, or a mapping split -> local file (.csv, .tsv, .jsonl, .json, .parquet, or
    # CoNLL .conll/.txt for NER). With a mapping, its keys are our split names and `splits` is ignored.
    source: Any
    hub_config: Optional[str] = None  # configuration of a Hub dataset, e.g. "sst2"
    # our split -> the source's split name; "test" is optional: missing from the source = no test predictions
    splits: Dict[str, str] = field(
        default_factory=lambda: {"train": "train", "validation": "validation", "test": "test"}
    )
    text_column: str = "sentence"  # the column holding the (first) sentence
    text_pair_column: Optional[str] = None  # second sentence, for task.input: pair
    label_column: str = "label"  # the column holding the label (a class or a number)
    tokens_column: str = "tokens"  # token_classification: the words of a sentence
    tags_column: str = "ner_tags"  # token_classification: one tag per word
    max_length: int = bounded(128, low=4)  # tokens per row, special tokens included
    batch_size: int = bounded(32, low=1)  # rows per training step
    eval_batch_size: int = bounded(64, low=1)  # rows per prediction batch
    pad_to_multiple_of: int = bounded(8, low=1)  # pad each batch's length to a multiple of this
    num_proc: Optional[int] = bounded(None, low=1)  # processes for tokenisation


@dataclass
class FreshAdaptersConfig:
    """recipes/finetune.py's ``adapters`` section: the adapters ``tuning=adapters`` adds to a
    model without any (an adapter-free student, a BERT checkpoint), one set per iteration (per
    layer for BERT). A model with adapters of its own tunes those and ignores this section."""

    # houlsby: after the attention and the FFN outputs; pfeiffer: after the FFN output only. Both
    # start as the identity (W_up = 0), so the model computes exactly what it did until they
    # train; MiniALBERT's LayerNorm'd adapters would not, so they cannot be added fresh.
    placement: Literal[FRESH_PLACEMENTS] = "houlsby"
    reduction_factor: int = bounded(16, low=1)  # bottleneck width: hidden_size / this (must divide it)


@dataclass
class FinetuneConfig:
    """recipes/finetune.py: a student (or any BERT-family checkpoint) fine-tuned on one task."""

    output_dir: str  # everything the run writes goes here (locked while it runs)
    # A student folder this library wrote (native or ALBERT format), or a Hugging Face BERT-family
    # checkpoint (folder or Hub id) to compare the teacher on the same task.
    checkpoint_dir: str
    data: TaskDataConfig  # where the task's splits come from and how they are read (keys below)
    task: TaskConfig = field(default_factory=dict)  # what is predicted and scored (keys below)
    revision: Optional[str] = None  # of a Hub checkpoint_dir
    # full: everything trains; adapters: the per-iteration adapters and the head (MiniALBERT's
    # adapter tuning; the run saves an adapter set), fresh ones (`adapters` below) on a model
    # without any; head: the head only
    tuning: Literal["full", "adapters", "head"] = "full"
    # tuning=adapters on a model without adapters (an adapter-free student, a BERT checkpoint):
    # the identity-initialised adapters it adds (keys below); unused otherwise
    adapters: FreshAdaptersConfig = field(default_factory=dict)
    classifier_dropout: float = bounded(0.1, low=0.0, high=1.0, high_open=True)  # before the head's classifier
    # any torch.optim optimizer with its arguments; biases and norm weights are never decayed.
    # fused AdamW (one kernel for all tensors) makes a CPU step 1.16x (fp32) to 1.23x (bf16)
    # faster on a 22.7M-parameter BERT (benchmarks/finetune_vs_trainer.py); same updates to 1e-7
    optimizer: Component = component_field(
        {"_component_": "torch.optim.AdamW", "lr": 5e-5, "weight_decay": 0.01, "fused": True}, provided=("params",)
    )
    # the learning-rate multiplier by step: linear_warmup_decay or cosine_warmup_decay (warmup_steps, final_ratio)
    lr_schedule: Component = component_field(
        {"_component_": "components.training.linear_warmup_decay", "warmup_steps": 0},
        provided=("total_steps",),
    )
    seed: int = 42  # seeds the head, dropout and the data order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "fp32", "bf16"] = "fp32"  # as distillation's: fp32 | bf16 (autocast) | auto
    epochs: int = bounded(3, low=1)  # passes over the train split, when max_steps is null
    max_steps: Optional[int] = bounded(None, low=1)  # overrides epochs
    clip_grad_norm: Optional[float] = bounded(1.0, low=0.0)  # null: log the norm without clipping
    log_every_n_steps: int = bounded(10, low=1)  # metrics.jsonl and the dashboard
    # null: at the end of every epoch. Each evaluation keeps the best model and writes a checkpoint.
    eval_every_n_steps: Optional[int] = bounded(None, low=1)
    keep_last_n_checkpoints: int = bounded(1, low=0)  # 0: keep all
    resume_from_checkpoint: bool = False  # continue from the newest usable checkpoint in output_dir
    # A checkpoint records the task data's and the starting model's fingerprints; a resume on
    # changed ones is refused unless named here: [data], [model] or both.
    allow_changes_on_resume: List[Literal["data", "model"]] = field(default_factory=list)
    compile: bool = False  # torch.compile the task model (dynamic shapes: batches differ in length)
    # Dashboard for the logged scalars: null is TensorBoard under <output_dir>/tensorboard; or any
    # torchtune metric logger (torchtune.training.metric_logging.DiskLogger, WandBLogger,
    # MLFlowLogger...) with its arguments. metrics.jsonl is written either way.
    metric_logger: Optional[Component] = None
    # torchtune.training.setup_torch_profiler with its arguments (enabled, wait_steps,
    # warmup_steps, active_steps, ...); traces go to <output_dir>/profiling unless output_dir is set
    profiler: Optional[Component] = None
    log_peak_memory_stats: bool = True  # peak CUDA memory at every logged step (CUDA only)


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
    # The reported metric, or several (GLUE's F1/accuracy for MRPC and QQP, Pearson/Spearman for
    # STS-B: the column shows each, the average counts their mean); null: the fine-tuning
    # task.metric (finetune), accuracy / pearson for probes, spearman for similarity
    metric: Optional[Union[str, List[str]]] = None
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
    # name -> a task (keys below: EvalTaskConfig), a column group of the table; `name: null` drops one
    tasks: Dict[str, Any]
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


# ------------------------------------------------------------------ checks across keys
# What no single key can say, checked as soon as the objects the keys describe are built, so
# that a run fails before its first step rather than hours in.


def check_distill_setup(cfg, stages: Optional[List[Dict]], parameter_names: Sequence[str], loss, student) -> None:
    """The stages against the built student and loss (``parameter_names``: what trains, named
    ``student.*`` / ``loss.*``), and the data keys against the loss and the student."""
    with config_section("stages"):
        check_stage_patterns(stages, parameter_names)
        for stage in stages or []:
            loss.check_weights(stage.get("loss_weights") or loss.weights)
            loss.check_layers(stage.get("layers"))
    if cfg.data.mlm_probability == 0:
        for stage in stages or [{"name": "the run", "loss_weights": None}]:
            weights = stage.get("loss_weights") or loss.weights
            needs_masks = [term for term in ("mlm", "output") if weights.get(term)]
            if needs_masks:
                raise ConfigError(
                    f"data.mlm_probability=0 masks no token, but {stage['name']!r} weights the "
                    f"{' and '.join(needs_masks)} term, which is computed at masked positions. Set those weights to 0 "
                    "(hidden-state and attention distillation need no masks) or mask tokens"
                )
    if cfg.data.pack and loss.attention.reduction_over == "element":
        raise ConfigError(
            "data.pack=true with loss.attention_reduction=element: that reduction divides by the padded row "
            "length, which packing changes. Use attention_reduction=distribution or data.pack=false"
        )
    if cfg.data.pack and student.config.get("trigram_input"):
        raise ConfigError(
            "data.pack=true with a trigram-input student: its first and last tokens would read the neighbouring "
            "windows' tokens. Set data.pack=false or student.trigram_input=false"
        )


def check_finetune_setup(cfg, encoder) -> None:
    """The tuning mode against the model fine-tuning starts from: adapters tune where the model
    has them or can take fresh ones (``adapters``; the recipe adds them)."""
    if cfg.tuning == "adapters" and getattr(encoder, "adapters", None) is None and not takes_adapters(encoder):
        raise ConfigError(
            f"tuning=adapters but {cfg.checkpoint_dir} has no adapters and a {type(encoder).__name__} has no "
            "sites for fresh ones: use tuning=full or tuning=head"
        )
