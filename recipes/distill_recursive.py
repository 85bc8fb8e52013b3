"""Distil a BERT-family teacher into a compact student on one device: a recursive
(MiniALBERT-style) student or a bottleneck (MobileBERT-style) one, whichever ``student`` builds.

    tune run recipes/distill_recursive.py --config configs/tiny.yaml [key=value ...]

The run is a list of stages (see components/training/stages.py). Every ``save_every_n_steps``
optimizer steps it writes a full resume checkpoint under ``<output_dir>/checkpoints/``;
re-running the same command with ``resume_from_checkpoint=True`` continues from the newest one
and reproduces the losses of an uninterrupted run. The student lands in
``<output_dir>/student/``, TensorBoard events in ``<output_dir>/tensorboard/``.
"""

import logging
import sys
import time
from functools import partial
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from components.checkpointing import save_student
from components.checkpointing.sentence_transformers import teacher_sentence_modules
from components.config import accepts, check_config, config_section, instantiate, missing_arguments, parse
from components.data import build_windows, GlobalBatchSampler, MLMMasker
from components.errors import CheckpointError, ConfigError, NonFiniteLossError
from components.models.student import check_student, copy_teacher_embeddings, init_from_teacher
from components.quantization import get_scheme, prepare_qat, set_fake_quantize
from components.training.distill import distill_step, Evaluator, step_batches
from components.training.parallel import log_precision, resolve_device, resolve_dtype, SingleDevice
from components.training.run import configure_logging, execute, Run
from components.training.schema import check_distill_setup, DistillConfig
from components.training.stages import (
    apply_trainable,
    expand_stages,
    group_lambdas,
    param_groups,
    resolve_stages,
    stage_at,
)

log = logging.getLogger("distill_recursive")


# Keys that decide the model and the data order: a resumed run must not change them.
MUST_MATCH_ON_RESUME = ("seed", "teacher", "student", "data", "gradient_accumulation_steps")
MAY_CHANGE_ON_RESUME = ("data.num_proc", "data.max_eval_windows")


class DistillRecursiveRecipe:
    """setup() builds everything, train() runs the stages, cleanup() closes the loggers.
    The run's bookkeeping (output folder, resume, signals, writes) is ``self.run``'s."""

    def __init__(self, cfg: DictConfig):
        self.cfg = check_config(expand_stages(cfg), DistillConfig)
        self.output_dir = Path(self.cfg.output_dir)
        self.parallel = self.make_parallel()
        self.device = self.parallel.device
        if not self.parallel.is_main:  # rank 0 speaks for all
            logging.getLogger().setLevel(logging.ERROR)
        self.bf16, self.dtype_reason = resolve_dtype(self.cfg.dtype, self.device)
        self.seed = self.cfg.seed
        self.step = 0  # optimizer steps completed
        self.stop_agreed = False  # every rank stops after the current step
        self.run = Run(self.cfg, self.parallel, MUST_MATCH_ON_RESUME, MAY_CHANGE_ON_RESUME, outputs=("student",))

    def make_parallel(self) -> SingleDevice:
        """One device here; the distributed recipe returns its DataParallel."""
        return SingleDevice(resolve_device(self.cfg.device))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        resume = self.run.start()
        torch.manual_seed(self.seed)  # the same student on every rank

        with self.parallel.main_first():  # rank 0, then each node's first rank, build any files (smoke assets)
            self.teacher = self._build_teacher().to(self.device)
        self.tokenizer = self.teacher.tokenizer
        # a sentence-embedding teacher's pipeline, repeated in the student's folder (read now: a
        # broken modules.json stops the run before training)
        self.sentence_modules = teacher_sentence_modules(cfg.teacher)
        asks = [key for key, on in (("dtype=bf16", self.bf16), ("teacher.dtype=bf16", _holds_bf16(self.teacher))) if on]
        log_precision(log, self.device, self.dtype_reason, asks)
        with config_section("student"):
            self.student = self._build_student().to(self.device)
            if cfg.copy_teacher_embeddings:
                copy_teacher_embeddings(self.student, self.teacher.encoder)
            start = cfg.init_from_teacher
            if start.layer is not None or start.embeddings:
                init_from_teacher(self.student, self.teacher.encoder, start.layer, start.embeddings)
        with config_section("loss"):
            self.loss_fn = instantiate(cfg.loss, student=self.student.spec, teacher=self.teacher.spec).to(self.device)
        self.default_weights = dict(self.loss_fn.weights)  # for stages that set none
        # what trains, under the names stages and checkpoints use: student.*, loss.*
        self.trainable = torch.nn.ModuleDict({"student": self.student, "loss": self.loss_fn})
        stage_configs = OmegaConf.to_container(cfg.stages) if cfg.stages else None
        names = [n for n, _ in self.trainable_named_parameters()]
        check_distill_setup(cfg, stage_configs, names, self.loss_fn, self.student)
        log.info(
            "Teacher %s: %d layers, hidden %d. Student: %s, %.2fM parameters (%.2fM without the MLM head)",
            self.teacher.name,
            self.teacher.spec.num_layers,
            self.teacher.spec.hidden_size,
            type(self.student).__name__,
            sum(p.numel() for p in self.student.parameters()) / 1e6,
            sum(p.numel() for n, p in self.student.named_parameters() if not n.startswith("mlm_head")) / 1e6,
        )
        torch.manual_seed(self.seed + self.parallel.rank)  # dropout differs across ranks
        # quantisation-aware stages: fake-quantisable modules, prepared once before compile and
        # sharding; each stage then turns fake quantisation on or off
        self.qat_scheme = None
        if any(stage.get("fake_quantize") for stage in stage_configs or []):
            with config_section("quantization"):
                self.qat_scheme = get_scheme(cfg.quantization.scheme, cfg.quantization.group_size)
                prepare_qat(self.student, self.qat_scheme)
        if cfg.enable_activation_checkpointing:
            self.student.activation_checkpointing = True
        if cfg.compile:
            self._compile()
        self.parallel.broadcast_parameters(self.trainable)  # the same initial weights on every rank
        self.parallel.shard_student(self.student)

        self._setup_data()
        with config_section("stages"):
            self.stages = resolve_stages(stage_configs, self.max_steps)
        with config_section("lr_schedule"):
            self._setup_optimizer()

        self.run.check_ranks_agree(
            {
                "config": OmegaConf.to_yaml(cfg),
                "data": self.run.fingerprints.get("data"),
                "teacher": self.run.fingerprints.get("teacher"),
                "windows": self.window_counts,
                "max_steps": self.max_steps,
            }
        )
        if resume is not None:
            self._load_checkpoint(*resume)
        self.metrics = self.run.open_metrics(self.step + 1)

    def _build_teacher(self) -> torch.nn.Module:
        if self.parallel.shard_teacher is None:
            return instantiate(self.cfg.teacher)
        if not accepts(self.cfg.teacher, "shard"):
            raise ConfigError(
                f"teacher: {self.cfg.teacher._component_} cannot be sharded (it takes no 'shard' argument)"
            )
        return instantiate(self.cfg.teacher, shard=self.parallel.shard_teacher)

    def _build_student(self) -> torch.nn.Module:
        given = self.cfg.student
        teacher_vocab = self.teacher.spec.vocab_size
        provided = {"vocab_size": teacher_vocab, "pad_token_id": self.tokenizer.pad_token_id}
        student = instantiate(given, **missing_arguments(given, provided))
        check_student(student)
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
        with config_section("data"), self.parallel.main_first():  # rank 0, then each node's first rank, fill the caches
            source = data.source
            if OmegaConf.is_dict(source) or isinstance(source, dict):
                source = instantiate(source)
            self.windows, held_out, fingerprint = build_windows(data, source, self.tokenizer, self.seed)
        self.run.identify(data=fingerprint, teacher=getattr(self.teacher, "fingerprint", None))
        self.window_counts = {"training": len(self.windows), "held-out": 0 if held_out is None else len(held_out)}
        self.masker = MLMMasker(self.tokenizer, data.mlm_probability)
        world, rank = self.parallel.world_size, self.parallel.rank
        with config_section("data"):
            self.sampler = GlobalBatchSampler(
                len(self.windows), data.batch_size, cfg.gradient_accumulation_steps, world, rank, self.seed
            )
        self.max_steps = self.run.plan_steps(cfg.max_steps, cfg.epochs, self.sampler.steps_per_epoch)
        self.evaluator = (
            Evaluator(
                held_out,
                self.masker,
                data.batch_size,
                self.tokenizer.pad_token_id,
                self.seed,
                data.pad_to_multiple_of,
                data.max_length,
                world,
                rank,
            )
            if held_out is not None and len(held_out) >= world
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
            pack=data.pack,
        )

    def trainable_named_parameters(self):
        return self.trainable.named_parameters()

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        weight_decay = cfg.optimizer.get("weight_decay", 0.0)
        self.groups = param_groups(self.trainable_named_parameters(), self.stages, weight_decay)
        self.optimizer = instantiate(cfg.optimizer, self.groups)
        self.schedule = instantiate(cfg.lr_schedule, total_steps=self.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, group_lambdas(self.groups, self.stages, self.schedule)
        )
        self.params = [p for _, p in self.trainable_named_parameters()]

    def _load_checkpoint(self, path: Path, state: Dict) -> None:
        try:
            self.parallel.load_state_dicts(self.trainable, self.optimizer, state["model"], state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"Checkpoint {path} does not fit this config (was the model or optimizer changed?): {e}"
            ) from e
        self.step = self.run.resumed(path, state)
        self.sampler.seek(self.step)

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        # log lines go through tqdm.write, so they do not tear the progress bar
        with self.run.stop_on_signals(), logging_redirect_tqdm(), self.run.profiler() as profiler:
            self._train(profiler)

    def _train(self, profiler) -> None:
        cfg = self.cfg
        stage = None
        progress = tqdm(
            total=self.max_steps,
            initial=self.step,
            desc="distill",
            dynamic_ncols=True,
            disable=not self.parallel.is_main,
        )
        while self.step < self.max_steps:
            if stage is not stage_at(self.stages, self.step):
                stage = self._enter_stage(stage_at(self.stages, self.step))
            try:
                metrics = self.train_step()
            except NonFiniteLossError as e:
                saved = self.run.saved_step
                last = f"the checkpoint of step {saved} is kept" if saved else "no checkpoint was written"
                raise NonFiniteLossError(
                    f"{e}. Nothing of this step was applied and {last}; lower the learning rate or "
                    "check the data, then run again with resume_from_checkpoint=True"
                ) from None
            self.step += 1
            profiler.step()
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss/total']:.4f}", stage=stage.name)
            if self.step % cfg.log_every_n_steps == 0 or self.step == self.max_steps:
                self.run.log({**metrics, **self.run.memory_stats()}, self.step)
            if cfg.eval_every_n_steps and self.step % cfg.eval_every_n_steps == 0 and self.step < self.max_steps:
                self._evaluate()
            if cfg.save_every_n_steps and self.step % cfg.save_every_n_steps == 0 and self.step < self.max_steps:
                self.save_checkpoint()
            if self.run.poll_stop(agreed=self.stop_agreed) and self.step < self.max_steps:
                progress.close()
                self.run.interrupt(self.step, self.max_steps, self.save_checkpoint)
        progress.close()
        if self.run.saved_step != self.step:
            self.save_checkpoint()
        self.export_student()
        self._evaluate()

    def _enter_stage(self, stage):
        log.info("Stage %r: steps %d-%d", stage.name, stage.start + 1, stage.end)
        apply_trainable(self.trainable_named_parameters(), stage)
        self.loss_fn.set_weights(stage.loss_weights or self.default_weights)
        self.loss_fn.set_layers(stage.layers)
        if self.qat_scheme is not None:
            set_fake_quantize(self.student, stage.fake_quantize)
        return stage

    def train_step(self) -> Dict[str, float]:
        """Optimizer step ``self.step + 1`` (``distill_step`` on this step's batches) and its metrics."""
        started = time.perf_counter()
        lr = max(group["lr"] for group in self.optimizer.param_groups)  # this step's, after stage scales
        result = distill_step(
            self.student,
            self.teacher,
            self.loss_fn,
            self.step_batches(step=self.step),
            self.params,
            self.optimizer,
            self.parallel,
            step=self.step,
            max_norm=self.cfg.clip_grad_norm,
            autocast=self.autocast,
            stop=self.run.stop_signal is not None,
        )
        self.scheduler.step()
        metrics = {f"loss/{name}": v for name, v in result.terms.items()}
        metrics.update(
            {
                "lr": lr,
                "grad_norm": result.grad_norm,
                "tokens_per_second": result.tokens / (time.perf_counter() - started),
                "stage": float(self.stages.index(stage_at(self.stages, self.step))),
            }
        )
        self.stop_agreed = result.stop  # whether every rank stops after this step (see Run.poll_stop)
        return metrics

    def _evaluate(self) -> Optional[Dict[str, float]]:
        if self.evaluator is None:
            return None
        metrics = self.evaluator(
            self.student,
            self.teacher,
            self.loss_fn,
            self.device,
            self.autocast,
            self.parallel.reduce_sum,
            progress=self.parallel.is_main,
        )
        self.run.log(metrics, self.step)
        log.info("Step %d: %s", self.step, ", ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in metrics.items()))
        return metrics

    # ------------------------------------------------------------------ save
    def save_checkpoint(self) -> Path:
        """Every rank takes part (sharded state is gathered); the main rank writes."""
        model_state, optimizer_state = self.parallel.state_dicts(self.trainable, self.optimizer)
        state = {
            "model": model_state,  # student.* and loss.* (the hidden-state projection)
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
        }
        return self.run.save_checkpoint(self.step, state)

    def export_student(self) -> Path:
        folder = self.output_dir / "student"
        student = self.parallel.full_student(self.student)  # gathered on the main rank

        metadata = None
        if self.qat_scheme is not None:  # export_student.py defaults to the scheme trained for
            steps = sum(s.end - s.start for s in self.stages if s.fake_quantize)
            scheme = self.qat_scheme
            metadata = {"quantization_aware": {"scheme": scheme.name, "group_size": scheme.group_size, "steps": steps}}

        def write():
            try:
                fmt = save_student(
                    student, folder, self.tokenizer, metadata=metadata, sentence_modules=self.sentence_modules
                )
            except OSError as e:
                raise CheckpointError(
                    f"Could not export the student to {folder}: {e}. The checkpoint of step {self.run.saved_step} "
                    "holds it; free space and run again with resume_from_checkpoint=True to export"
                ) from e
            log.info("Exported the student (%s format) to %s", fmt, folder)
            if self.sentence_modules is not None:
                log.info(
                    "It is a sentence-transformers model too: SentenceTransformer(%r)%s",
                    str(folder),
                    " after `import components` (it registers the student's model type)" if fmt == "native" else "",
                )

        self.run.on_main(write)
        return folder

    def cleanup(self) -> None:
        self.run.close()


def _holds_bf16(module: torch.nn.Module) -> bool:
    return any(p.dtype == torch.bfloat16 for p in module.parameters())


def main(recipe_class, cfg: DictConfig) -> None:
    configure_logging()
    execute(recipe_class(cfg))


@parse
def recipe_main(cfg: DictConfig) -> None:
    main(DistillRecursiveRecipe, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
