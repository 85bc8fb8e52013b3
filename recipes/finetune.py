"""Fine-tune a distilled student (or any BERT-family checkpoint) on a downstream task.

    tune run recipes/finetune.py --config configs/glue_sst2.yaml \
        checkpoint_dir=<model folder> output_dir=<dir> [tuning=full|adapters|head]

Sentence classification and regression (single sentences or pairs) and token classification
(NER). The model is evaluated on the validation split every epoch (or every
``eval_every_n_steps``) and the best one by the task's metric is kept:

    <output_dir>/model/          tuning=full: the whole fine-tuned model
    <output_dir>/adapter_set/    tuning=adapters|head: only what trained (adapters + head, or the
                                 head) and a manifest naming the base (components.inference.adapter_sets)
    <output_dir>/predictions/    validation.tsv, test.tsv: the best model's predictions
    <output_dir>/results.json    the best validation metrics

tuning=adapters on a model without adapters (an adapter-free student, a BERT checkpoint) first
adds fresh identity adapters (the ``adapters`` keys; components.models.add_adapters).

Checkpoints, resume, signals, the lock on output_dir and the metric logs work exactly as in
distillation (components/training/run.py).
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

from components.checkpointing.finetuned import base_fingerprint, load_encoder
from components.checkpointing.hub import resolve_checkpoint_dir
from components.checkpointing.weights import weight_files
from components.config import check_config, config_section, instantiate, parse
from components.data.task_data import load_task_data, task_batches
from components.errors import CheckpointError
from components.fingerprint import model_folder_fingerprint
from components.inference import predict
from components.inference.task_metrics import is_better, resolve_metric
from components.models.adapters import add_adapters, PLACEMENTS
from components.models.heads import TaskModel, tuning_patterns
from components.training.distill import check_finite
from components.training.finetune import (
    finetune_loss,
    load_best,
    OUTPUTS,
    save_best,
    steps_per_epoch,
    write_results,
    write_split_predictions,
)
from components.training.parallel import clip_gradients, log_precision, resolve_device, resolve_dtype, SingleDevice
from components.training.run import configure_logging, execute, Run
from components.training.schema import check_finetune_setup, FinetuneConfig
from components.training.stages import apply_trainable, group_lambdas, param_groups, resolve_stages

log = logging.getLogger("finetune")

# Keys that decide the model and the data order: a resumed run must not change them.
MUST_MATCH_ON_RESUME = ("seed", "checkpoint_dir", "revision", "tuning", "task", "data", "classifier_dropout")
MAY_CHANGE_ON_RESUME = (
    "data.num_proc",
    "data.eval_batch_size",
)  # (a moved data.source or checkpoint_dir: by fingerprint)


class FinetuneRecipe:
    """setup() loads the model and the task, train() fine-tunes, cleanup() closes the run."""

    def __init__(self, cfg: DictConfig):
        self.cfg = check_config(cfg, FinetuneConfig)
        self.output_dir = Path(self.cfg.output_dir)
        self.parallel = SingleDevice(resolve_device(self.cfg.device))
        self.device = self.parallel.device
        self.bf16, self.dtype_reason = resolve_dtype(self.cfg.dtype, self.device)
        self.step = 0
        self.best: Dict = {"value": None, "step": None, "metrics": None}
        self.run = Run(self.cfg, self.parallel, MUST_MATCH_ON_RESUME, MAY_CHANGE_ON_RESUME, outputs=OUTPUTS)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        resume = self.run.start()
        log_precision(log, self.device, self.dtype_reason, ["dtype=bf16"] if self.bf16 else [])
        torch.manual_seed(cfg.seed)
        with config_section("checkpoint_dir"):
            folder = resolve_checkpoint_dir(cfg.checkpoint_dir, cfg.revision)
            encoder, self.tokenizer = load_encoder(str(folder))
        with config_section("data"):
            data = OmegaConf.to_container(cfg.data)
            if isinstance(data["source"], dict) and "_component_" in data["source"]:
                data["source"] = instantiate(data["source"])  # e.g. the smoke task's files
            self.task = load_task_data(data, OmegaConf.to_container(cfg.task), self.tokenizer)
        self.run.identify(data=self.task.fingerprint, model=model_folder_fingerprint(folder, weight_files(folder)[1]))
        self.metric = resolve_metric(self.task.task_type, cfg.task.metric)
        check_finetune_setup(cfg, encoder)
        self.added_adapters = self._add_adapters(encoder)
        self.model = TaskModel(encoder, self.task.task_type, self.task.num_labels, cfg.classifier_dropout).to(
            self.device
        )

        if cfg.compile:  # in place: the state dict keeps its names
            self.model.compile(dynamic=True)
        self.steps_per_epoch = steps_per_epoch(self.task, cfg.data.batch_size)
        self.max_steps = self.run.plan_steps(cfg.max_steps, cfg.epochs, self.steps_per_epoch)
        # the tuning mode is one stage: its globs say what trains
        (stage,) = resolve_stages([{"name": cfg.tuning, "trainable": tuning_patterns(cfg.tuning)}], self.max_steps)
        apply_trainable(self.model.named_parameters(), stage)
        self.trained = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.trained]
        total, trained = sum(p.numel() for p in self.model.parameters()), sum(p.numel() for p in self.params)
        log.info(
            "Tuning %s: %s of %s parameters train (%.2f%%)%s",
            cfg.tuning,
            f"{trained:,}",
            f"{total:,}",
            100 * trained / total,
            "; the adapters' own LayerNorms train, the shared layer's stay frozen"
            if cfg.tuning == "adapters" and PLACEMENTS[encoder.config["adapter_placement"]][1]
            else "",
        )
        with config_section("optimizer"):
            groups = param_groups(self.trained, [stage], cfg.optimizer.get("weight_decay", 0.0))
            self.optimizer = instantiate(cfg.optimizer, groups)
        with config_section("lr_schedule"):
            schedule = instantiate(cfg.lr_schedule, total_steps=self.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, group_lambdas(groups, [stage], schedule))
        if cfg.tuning != "full":  # what an adapter set is put back on: all but the adapters it replaces
            # (fresh adapters all train, so this is the base as it is on disk)
            replaced = [n[len("encoder.") :] for n, _ in self.trained if n.startswith("encoder.")]
            self.base = {"path": str(cfg.checkpoint_dir), "sha256": base_fingerprint(encoder.state_dict(), replaced)}
            if self.added_adapters is not None:
                self.base["adds_adapters"] = self.added_adapters
        if resume is not None:
            self._load_checkpoint(*resume)
        self.metrics = self.run.open_metrics(self.step + 1)

    def _add_adapters(self, encoder) -> Optional[Dict]:
        """tuning=adapters on a model without adapters: fresh identity ones (the ``adapters``
        keys), returned as the adapter set records them; a model with its own keeps them."""
        cfg = self.cfg
        if cfg.tuning != "adapters":
            return None
        if encoder.adapters is not None:
            log.info(
                "%s has %s adapters of its own (reduction factor %d): tuning those; the adapters keys are not used",
                cfg.checkpoint_dir,
                encoder.config["adapter_placement"],
                encoder.config["adapter_reduction_factor"],
            )
            return None
        added = {"placement": cfg.adapters.placement, "reduction_factor": cfg.adapters.reduction_factor}
        with config_section("adapters"):
            add_adapters(encoder, **added)
        log.info(
            "%s has no adapters: added fresh %s adapters (reduction factor %d) to each of its %d %s, "
            "identities until they train",
            cfg.checkpoint_dir,
            added["placement"],
            added["reduction_factor"],
            encoder.spec.num_layers,
            "iterations" if "num_iterations" in encoder.config else "layers",
        )
        return added

    def _load_checkpoint(self, path: Path, state: Dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"Checkpoint {path} does not fit this config: {e}") from e
        self.best = state["best"]
        self.step = self.run.resumed(path, state)

    # ------------------------------------------------------------------ train
    def train(self) -> None:
        # log lines go through tqdm.write, so they do not tear the progress bar
        with self.run.stop_on_signals(), logging_redirect_tqdm(), self.run.profiler() as profiler:
            self._train(profiler)

    def _train(self, profiler) -> None:
        cfg = self.cfg
        progress = tqdm(total=self.max_steps, initial=self.step, desc=f"finetune ({cfg.tuning})", dynamic_ncols=True)
        batches = None
        while self.step < self.max_steps:
            epoch, position = divmod(self.step, self.steps_per_epoch)
            if batches is None:  # the order of an epoch depends on (seed, epoch) only: resumable
                batches = task_batches(
                    self.task.splits["train"],
                    cfg.data.batch_size,
                    self.tokenizer.pad_token_id,
                    cfg.data.pad_to_multiple_of,
                    shuffle=True,
                    seed=cfg.seed,
                    epoch=epoch,
                    start=position,
                )
            started = time.perf_counter()
            metrics = self._train_step(next(batches))
            metrics["examples_per_second"] = cfg.data.batch_size / (time.perf_counter() - started)
            self.step += 1
            profiler.step()
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", epoch=epoch + 1)
            if self.step % cfg.log_every_n_steps == 0 or self.step == self.max_steps:
                self.run.log({**metrics, **self.run.memory_stats()}, self.step)
            end_of_epoch = self.step % self.steps_per_epoch == 0
            if end_of_epoch:
                batches = None
            every = cfg.eval_every_n_steps
            if (every and self.step % every == 0) or (not every and end_of_epoch) or self.step == self.max_steps:
                progress.clear()
                self._evaluate()
                self.save_checkpoint()
            if self.run.poll_stop() and self.step < self.max_steps:
                progress.close()
                self.run.interrupt(self.step, self.max_steps, self.save_checkpoint)
        progress.close()
        self._finish()

    def _train_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        self.model.train()
        with self.autocast():
            loss = finetune_loss(self.model, batch, self.device)
        check_finite(loss.item(), self.step + 1, "loss", {"loss": loss.item()})
        loss.backward()
        grad_norm = clip_gradients(self.params, self.cfg.clip_grad_norm or float("inf"))
        check_finite(grad_norm, self.step + 1, "gradient norm", {"loss": loss.item()})
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm)}

    def _predict(self, split: str):
        return predict(
            self.model,
            self.task.splits[split],
            self.task,
            self.cfg.data.eval_batch_size,
            self.tokenizer.pad_token_id,
            self.cfg.data.pad_to_multiple_of,
            self.device,
            self.autocast,
            progress=True,
        )

    def _evaluate(self) -> None:
        _, metrics = self._predict("validation")
        self.run.log({f"eval/{k}": v for k, v in metrics.items()}, self.step)
        value = metrics[self.metric]
        improved = is_better(self.metric, value, self.best["value"])
        log.info(
            "Step %d (epoch %.2f): validation %s%s",
            self.step,
            self.step / self.steps_per_epoch,
            ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
            f" (best {self.metric} so far)" if improved else "",
        )
        if improved:
            self.best = {"value": value, "step": self.step, "metrics": metrics}
            self.run.on_main(self._save_best)

    def _save_best(self) -> None:
        trained = [n for n, _ in self.trained]
        base = getattr(self, "base", None)
        manifest = save_best(
            self.output_dir, self.model, self.cfg.tuning, trained, self._task_description(), self.tokenizer, base
        )
        if manifest is not None and not getattr(self, "_size_logged", False):
            self._size_logged = True
            log.info(
                "Adapter set: %.1f KB, %.2f%% of the base's %.1f MB (%d tensors)",
                manifest["bytes"] / 1e3,
                100 * manifest["bytes"] / manifest["base_bytes"],
                manifest["base_bytes"] / 1e6,
                len(manifest["tensors"]),
            )

    def _task_description(self) -> Dict:
        cfg = self.cfg
        return {
            "type": self.task.task_type,
            "input": cfg.task.input,
            "label_names": self.task.label_names,
            "label_values": self.task.label_values,
            "metric": self.metric,
            "max_length": cfg.data.max_length,
            "tuning": cfg.tuning,
            "best": {"step": self.step, self.metric: self.best["value"]},
        }

    def save_checkpoint(self) -> Path:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best": self.best,
        }
        return self.run.save_checkpoint(self.step, state)

    # ------------------------------------------------------------------ finish
    def _finish(self) -> None:
        """The best model's predictions and the results."""
        load_best(self.output_dir, self.model, self.cfg.tuning)
        for split in ("validation", "test"):
            if split in self.task.splits:
                rows, _ = self._predict(split)
                self.run.on_main(partial(write_split_predictions, self.output_dir, split, rows, self.task.task_type))
        results = {
            "metric": self.metric,
            "best": self.best,
            "tuning": self.cfg.tuning,
            "trained_parameters": sum(p.numel() for p in self.params),
            "saved": "model" if self.cfg.tuning == "full" else "adapter_set",
        }
        self.run.on_main(partial(write_results, self.output_dir, results))
        log.info(
            "Best validation %s: %.4f at step %d; saved under %s",
            self.metric,
            self.best["value"],
            self.best["step"],
            self.output_dir / results["saved"],
        )

    def cleanup(self) -> None:
        self.run.close()


@parse
def recipe_main(cfg: DictConfig) -> None:
    configure_logging()
    execute(FinetuneRecipe(cfg))


if __name__ == "__main__":
    sys.exit(recipe_main())
