"""Distil a BERT-family teacher into a recursive (MiniALBERT-style) student on one device.

    tune run recipes/distill_recursive.py --config configs/tiny.yaml [key=value ...]

The run is a list of stages (see components/training/stages.py). Every ``save_every_n_steps``
optimizer steps it writes a full resume checkpoint under ``<output_dir>/checkpoints/``;
re-running the same command with ``resume_from_checkpoint=True`` continues from the newest one
and reproduces the losses of an uninterrupted run. The student lands in
``<output_dir>/student/``, TensorBoard events in ``<output_dir>/tensorboard/``.
"""

import contextlib
import logging
import sys
import time
from functools import partial
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from components.checkpointing import CheckpointError, save_student
from components.checkpointing.resume import list_checkpoints, load_latest_checkpoint, save_checkpoint
from components.data import build_windows, CorpusError, GlobalBatchSampler, MLMMasker
from components.training.config import check_config, ConfigError, instantiate, parse, register_user_error
from components.training.distill import (
    check_finite,
    count_tokens,
    distill_forward,
    Evaluator,
    NonFiniteLossError,
    step_batches,
)
from components.training.metrics import MetricLogger
from components.training.schema import DistillConfig
from components.training.stages import (
    apply_trainable,
    group_lambdas,
    param_groups,
    resolve_stages,
    stage_at,
)

log = logging.getLogger("distill_recursive")
register_user_error(CheckpointError, CorpusError, NonFiniteLossError)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available")
    return device


class DistillRecursiveRecipe:
    """setup() builds everything, train() runs the stages, cleanup() closes the loggers."""

    def __init__(self, cfg: DictConfig):
        self.cfg = check_config(cfg, DistillConfig)
        self.output_dir = Path(self.cfg.output_dir)
        self.device = resolve_device(self.cfg.device)
        self.bf16 = self.cfg.dtype == "bf16"
        if self.bf16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"dtype=bf16 but {torch.cuda.get_device_name(self.device)} does not support bf16")
        self.seed = self.cfg.seed
        self.step = 0  # optimizer steps completed
        self.saved_step: Optional[int] = None  # step of the newest checkpoint on disk

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        resume = self._check_output_dir()
        torch.manual_seed(self.seed)

        self.teacher = instantiate(cfg.teacher).to(self.device)
        self.tokenizer = self.teacher.tokenizer
        self.student = self._build_student().to(self.device)
        self.loss_fn = instantiate(cfg.loss, student=self.student.spec, teacher=self.teacher.spec).to(self.device)
        self.default_weights = dict(self.loss_fn.weights)  # for stages that set none
        log.info(
            "Teacher %s: %d layers, hidden %d. Student: %s, %.2fM parameters (%.2fM without the MLM head)",
            self.teacher.name,
            self.teacher.spec.num_layers,
            self.teacher.spec.hidden_size,
            type(self.student).__name__,
            sum(p.numel() for p in self.student.parameters()) / 1e6,
            sum(p.numel() for n, p in self.student.named_parameters() if not n.startswith("mlm_head")) / 1e6,
        )
        if cfg.enable_activation_checkpointing:
            self.student.activation_checkpointing = True
        if cfg.compile:
            self._compile()

        self._setup_data()
        self.stages = resolve_stages(OmegaConf.to_container(cfg.stages) if cfg.stages else None, self.max_steps)
        for stage in self.stages:  # fail now, not hours in, on a stage that cannot work
            self.loss_fn.check_weights(stage.loss_weights or self.default_weights)
        self._setup_optimizer()

        if resume is not None:
            self._load_checkpoint(*resume)
        self.metrics = MetricLogger(self.output_dir, purge_step=self.step + 1 if resume else None)
        OmegaConf.save(self.cfg, self.output_dir / "config.yaml")

    def _check_output_dir(self):
        """A new run needs a fresh output_dir; a resumed one its newest good checkpoint."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        existing = list_checkpoints(self.output_dir)
        if not self.cfg.resume_from_checkpoint:
            if existing or (self.output_dir / "student").exists():
                raise ConfigError(
                    f"output_dir {self.output_dir} already holds a run. Continue it with "
                    "resume_from_checkpoint=True, or choose another output_dir"
                )
            return None
        found = load_latest_checkpoint(self.output_dir)
        if found is None:
            log.warning("resume_from_checkpoint=True but %s has no usable checkpoint: starting at step 0", self.output_dir)
        return found

    def _build_student(self) -> torch.nn.Module:
        given = self.cfg.student
        teacher_vocab = self.teacher.spec.vocab_size
        extra = {} if "vocab_size" in given else {"vocab_size": teacher_vocab}
        if "pad_token_id" not in given and self.tokenizer.pad_token_id is not None:
            extra["pad_token_id"] = self.tokenizer.pad_token_id
        student = instantiate(given, **extra)
        if student.spec.vocab_size != teacher_vocab:
            raise ConfigError(
                f"student vocabulary ({student.spec.vocab_size}, student.vocab_size) differs from the "
                f"teacher's ({teacher_vocab}, {self.teacher.name}). Leave student.vocab_size out to "
                "take the teacher's, or use a teacher with the same tokenizer"
            )
        return student

    def _compile(self) -> None:
        for module in [self.student, *getattr(self.teacher.encoder, "layers", [])]:
            module.compile(dynamic=True)

    def _setup_data(self) -> None:
        cfg, data = self.cfg, self.cfg.data
        limit = min(self.teacher.max_sequence_length, self.student.config.get("max_position_embeddings", 10**9))
        if data.max_length > limit:
            raise ConfigError(f"data.max_length={data.max_length} exceeds the models' {limit} positions")
        source = data.source
        if OmegaConf.is_dict(source) or isinstance(source, dict):
            source = instantiate(source)
        self.windows, held_out = build_windows(data, source, self.tokenizer, self.seed)
        self.masker = MLMMasker(self.tokenizer, data.mlm_probability)
        self.sampler = GlobalBatchSampler(
            len(self.windows), data.batch_size, cfg.gradient_accumulation_steps, seed=self.seed
        )
        self.max_steps = cfg.max_steps or cfg.epochs * self.sampler.steps_per_epoch
        self.evaluator = (
            Evaluator(held_out, self.masker, data.batch_size, self.tokenizer.pad_token_id, self.seed, data.pad_to_multiple_of)
            if held_out is not None
            else None
        )
        self.step_batches = partial(
            step_batches,
            self.windows,
            self.sampler,
            self.masker,
            seed=self.seed,
            pad_token_id=self.tokenizer.pad_token_id,
            max_length=data.max_length,
            pad_to_multiple_of=data.pad_to_multiple_of,
        )

    def trainable_named_parameters(self):
        yield from (("student." + n, p) for n, p in self.student.named_parameters())
        yield from (("loss." + n, p) for n, p in self.loss_fn.named_parameters())

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        weight_decay = cfg.optimizer.get("weight_decay", 0.0)
        self.groups = param_groups(self.trainable_named_parameters(), self.stages, weight_decay)
        self.optimizer = instantiate(cfg.optimizer, self.groups)
        self.schedule = instantiate(cfg.lr_schedule, total_steps=self.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, group_lambdas(self.groups, self.stages, self.schedule)
        )
        self.base_lr = cfg.optimizer.get("lr", self.optimizer.defaults.get("lr"))
        self.params = [p for _, p in self.trainable_named_parameters()]

    def _load_checkpoint(self, path: Path, state: Dict) -> None:
        try:
            self.student.load_state_dict(state["student"])
            self.loss_fn.load_state_dict(state["loss"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"Checkpoint {path} does not fit this config (was the model or optimizer changed?): {e}"
            ) from e
        self.sampler.load_state_dict(state["sampler"])
        self.step = self.saved_step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        log.info("Resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        cfg = self.cfg
        stage = None
        progress = tqdm(total=self.max_steps, initial=self.step, desc="distill", dynamic_ncols=True)
        while self.step < self.max_steps:
            if stage is not stage_at(self.stages, self.step):
                stage = self._enter_stage(stage_at(self.stages, self.step))
            try:
                metrics = self._train_step()
            except NonFiniteLossError as e:
                last = f"the checkpoint of step {self.saved_step} is kept" if self.saved_step else "no checkpoint was written"
                raise NonFiniteLossError(
                    f"{e}. Nothing of this step was applied and {last}; lower the learning rate or "
                    "check the data, then run again with resume_from_checkpoint=True"
                ) from None
            self.step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss/total']:.4f}", stage=stage.name)
            if self.step % cfg.log_every_n_steps == 0 or self.step == self.max_steps:
                self.metrics.log(metrics, self.step)
            if cfg.eval_every_n_steps and self.step % cfg.eval_every_n_steps == 0 and self.step < self.max_steps:
                self._evaluate()
            if cfg.save_every_n_steps and self.step % cfg.save_every_n_steps == 0 and self.step < self.max_steps:
                self.save_checkpoint()
        progress.close()
        self._evaluate()
        if self.saved_step != self.step:
            self.save_checkpoint()
        self.export_student()

    def _enter_stage(self, stage):
        log.info("Stage %r: steps %d-%d", stage.name, stage.start + 1, stage.end)
        apply_trainable(self.trainable_named_parameters(), stage)
        self.loss_fn.set_weights(stage.loss_weights or self.default_weights)
        return stage

    def _train_step(self) -> Dict[str, float]:
        started = time.perf_counter()
        batches = self.step_batches(step=self.step)
        num_masked, num_tokens = count_tokens(batches).tolist()
        totals: Dict[str, torch.Tensor] = {}
        for batch in batches:
            with self.autocast():
                out = distill_forward(self.student, self.teacher, self.loss_fn, batch.to(self.device), num_masked, num_tokens)
            out.total.backward()
            for name, value in [("total", out.total), *out.terms.items()]:
                totals[name] = totals.get(name, 0.0) + value.detach()
        values = {name: float(v) for name, v in totals.items()}
        check_finite(totals["total"], self.step + 1, "loss", values)
        max_norm = self.cfg.clip_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], max_norm)
        check_finite(grad_norm, self.step + 1, "gradient norm", values)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        metrics = {f"loss/{name}": v for name, v in values.items()}
        metrics.update(
            {
                "lr": self.base_lr * self.schedule(self.step),
                "grad_norm": float(grad_norm),
                "tokens_per_second": num_tokens / elapsed,
                "stage": float(self.stages.index(stage_at(self.stages, self.step))),
            }
        )
        return metrics

    def _evaluate(self) -> Optional[Dict[str, float]]:
        if self.evaluator is None:
            return None
        metrics = self.evaluator(self.student, self.teacher, self.loss_fn, self.device, self.autocast)
        self.metrics.log(metrics, self.step)
        log.info("Step %d: %s", self.step, ", ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in metrics.items()))
        return metrics

    # ------------------------------------------------------------------ save
    def save_checkpoint(self) -> Path:
        state = {
            "step": self.step,
            "student": self.student.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            },
        }
        path = save_checkpoint(self.output_dir, self.step, state, self.cfg.keep_last_n_checkpoints)
        self.saved_step = self.step
        log.info("Saved checkpoint %s", path)
        return path

    def export_student(self) -> Path:
        folder = self.output_dir / "student"
        fmt = save_student(self.student, folder, self.tokenizer)
        log.info("Exported the student (%s format) to %s", fmt, folder)
        return folder

    def cleanup(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()


@parse
def recipe_main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    recipe = DistillRecursiveRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
