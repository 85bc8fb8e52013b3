"""Evaluate models on tasks and write the papers' table: what is a student worth against its
teacher, at what size and speed, before and after int8?

    tune run recipes/evaluate.py --config configs/eval_tiny.yaml \
        'models={teacher: outputs/tiny/smoke_assets/teacher, student: outputs/tiny/student}'

Models are any folder this library writes (a student, an int8 export run by ONNX Runtime) or a
Hugging Face BERT-family checkpoint (folder or Hub id). Tasks are fine-tuning (recipes/finetune.py
itself, for every tuning x learning rate x seed), frozen-feature probes and zero-shot
similarity (components/evaluation/cells.py). Writes into ``output_dir``:

    results.json    every model's scores, average, % of the reference, parameters, bytes, latency
    report.md       the table: models as rows, tasks as columns
    report.png      average score against latency and against size
    cells/          one small JSON per finished cell: a rerun (after a crash or Ctrl-C) skips them
    runs/           the fine-tuning runs (an interrupted one resumes from its checkpoint)
    metrics.jsonl   each cell's scores as it finishes (and TensorBoard, or the metric_logger)
"""

import logging
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from components.checkpointing.resume import list_checkpoints
from components.config import check_config, check_section, config_section, parse
from components.errors import ConfigError, RunInterrupted
from components.evaluation.cells import (
    Cell,
    check_name,
    data_sections,
    finetune_config,
    finetune_lrs,
    predict_scores,
    probe_scores,
    read_result,
    reported_metrics,
    similarity_scores,
    task_settings,
    write_result,
)
from components.evaluation.models import latencies, open_model
from components.evaluation.report import Column, markdown, plot, summarize, write_json
from components.io import atomic_file, set_write_root
from components.training.metrics import MetricLogger
from components.training.parallel import resolve_device
from components.training.run import claim_output_dir, configure_logging, execute, instantiate_optional
from components.training.schema import EvalTaskConfig, EvaluateConfig
from recipes.finetune import FinetuneRecipe

log = logging.getLogger("evaluate")


class EvaluateRecipe:
    """setup() plans the cells, train() runs the ones not yet finished and writes the report."""

    def __init__(self, cfg: DictConfig):
        self.cfg = check_config(cfg, EvaluateConfig)
        self.output_dir = Path(self.cfg.output_dir)
        self.device = resolve_device(self.cfg.device)
        self.models = {name: path for name, path in self.cfg.models.items() if path is not None}
        if not self.models:
            raise ConfigError("models is empty: name at least one model (name: path)")
        for name in self.models:
            check_name("models:", name)
        if self.cfg.reference is not None and self.cfg.reference not in self.models:
            raise ConfigError(f"reference {self.cfg.reference!r} is not one of the models {sorted(self.models)}")
        tasks = {name: spec for name, spec in self.cfg.tasks.items() if spec is not None}  # name: null drops one
        if not tasks:
            raise ConfigError("tasks is empty: name at least one task")
        self.tasks: Dict[str, Dict[str, Any]] = {}
        for name, spec in tasks.items():
            check_name("tasks:", name)
            spec = check_section(
                OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec, EvalTaskConfig, f"tasks.{name}"
            )
            with config_section(f"tasks.{name}"):
                settings = task_settings(name, spec, OmegaConf.to_container(self.cfg.finetune_defaults))
                sections = data_sections(name, settings, self.cfg.output_dir)
            # a similarity column is Spearman unless named: a config file's task.metric is for fine-tuning
            named = spec["metric"] or (sections["task"]["metric"] if spec["kind"] != "similarity" else None)
            metric = reported_metrics(spec["kind"], named, sections["task"]["type"])
            self.tasks[name] = {"spec": spec, "settings": settings, "sections": sections, "metrics": metric}
        self.lock = None
        self.metrics = None
        self.stop_signal = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        self.lock = claim_output_dir(self.output_dir)
        sink = instantiate_optional("metric_logger", self.cfg.metric_logger) if self.cfg.metric_logger else None
        self.metrics = MetricLogger(self.output_dir, sink=sink)
        self.columns = self._columns()

    def _columns(self) -> List[Column]:
        columns = []
        for name, task in self.tasks.items():
            spec = task["spec"]
            tunings = spec["tuning"] if spec["kind"] == "finetune" else [None]
            for tuning in tunings:
                columns.append(Column(name, spec["kind"], task["metrics"], tuning, show_tuning=len(tunings) > 1))
        return columns

    def _cells(self, name: str, model) -> List[Cell]:
        """Every cell of one model (its efficiency cell first), named by what decides them."""
        fingerprint = model.fingerprint()
        lat = OmegaConf.to_container(self.cfg.latency)
        cells = [
            Cell(
                name,
                "_efficiency",
                "efficiency",
                {"model": fingerprint, "latency": lat, "threads": torch.get_num_threads()},
            )
        ]
        for task_name, task in self.tasks.items():
            spec = task["spec"]
            if spec["kind"] == "finetune" and model.kind == "finetuned":
                # a fine-tuned model is scored as it is, in its own tuning's column of a task of its type
                if model.task_model.task_type == task["sections"]["task"]["type"] and model.tuning in spec["tuning"]:
                    digest = {"model": fingerprint, "sections": task["sections"], "split": spec["split"]}
                    cells.append(Cell(name, task_name, "predict", digest, tuning=model.tuning))
            elif spec["kind"] == "finetune":
                for tuning in spec["tuning"]:
                    if tuning not in model.tunings:  # an ONNX file; adapters on a bottleneck student
                        continue  # its column stays empty ("—")
                    for lr in finetune_lrs(task_name, spec, task["settings"]):
                        for seed in spec["seeds"]:
                            settings = {k: v for k, v in task["settings"].items() if k != "output_dir"}
                            digest = {
                                "model": fingerprint,
                                "settings": settings,
                                "tuning": tuning,
                                "lr": lr,
                                "seed": seed,
                                "dtype": self.cfg.dtype,
                            }
                            cells.append(Cell(name, task_name, "finetune", digest, tuning, lr, seed))
            else:
                digest = {
                    "model": fingerprint,
                    "kind": spec["kind"],
                    "sections": task["sections"],
                    "split": spec["split"],
                    "c": spec["probe_c"],
                    "max_train_rows": spec["max_train_rows"],
                }
                cells.append(Cell(name, task_name, spec["kind"], digest))
        return cells

    # ------------------------------------------------------------------ run
    def train(self) -> None:
        with logging_redirect_tqdm():
            self._run_all()

    def _run_all(self) -> None:
        started = time.perf_counter()
        finished: List[Dict[str, Any]] = []
        info: Dict[str, Dict[str, Any]] = {}
        threads = torch.get_num_threads()
        for index, (name, path) in enumerate(self.models.items(), start=1):
            log.info("Model %d/%d: %s (%s)", index, len(self.models), name, path)
            with config_section(f"models.{name}"):
                model = open_model(name, path, self.device, threads)
            cells = self._cells(name, model)
            todo = [c for c in cells if read_result(c, self.output_dir) is None]
            log.info("%s: %d cells, %d finished earlier", name, len(cells), len(cells) - len(todo))
            progress = tqdm(
                total=len(cells), initial=len(cells) - len(todo), desc=f"evaluate {name}", dynamic_ncols=True
            )
            for cell in todo:
                if cell.kind != "finetune":
                    progress.set_postfix_str(cell.task)
                    self._finish(cell, self._score(cell, model))
                    progress.update(1)
            model.close()
            for cell in todo:
                if cell.kind == "finetune":
                    progress.clear()
                    self._finish(cell, self._finetune(cell, path))
                    progress.update(1)
                    if self.stop_signal is not None:  # asked to stop as the cell ended: it is kept
                        raise RunInterrupted(
                            f"Evaluation stopped by {signal.Signals(self.stop_signal).name} after cell {cell.label()}. "
                            "Run the same command again: finished cells are kept",
                            self.stop_signal,
                        )
            progress.close()
            for cell in cells:
                result = read_result(cell, self.output_dir)
                if cell.kind == "efficiency":
                    info[name] = {
                        "path": str(path),
                        "kind": model.kind,
                        **result["size"],
                        "latency_ms": result["latency_ms"],
                    }
                else:
                    finished.append(
                        {
                            "model": name,
                            "task": cell.task,
                            "tuning": cell.tuning,
                            "lr": cell.lr,
                            "seed": cell.seed,
                            "metrics": result["metrics"],
                        }
                    )
        self._report(info, finished, time.perf_counter() - started)

    def _finish(self, cell: Cell, result: Dict[str, Any]) -> None:
        write_result(cell, self.output_dir, result)
        step = sum(1 for _ in (self.output_dir / "cells").rglob("*.json"))
        scalars = {f"{cell.model}/{cell.task}/{k}": v for k, v in result.get("metrics", {}).items()}
        if scalars:
            self.metrics.log(scalars, step)

    def _score(self, cell: Cell, model) -> Dict[str, Any]:
        started = time.perf_counter()
        if cell.kind == "efficiency":
            lat = self.cfg.latency
            shapes = [tuple(s) for s in lat.shapes]
            result = {
                "size": model.size(),
                "latency_ms": latencies(model, shapes, lat.warmup, lat.repeats, model.max_length),
            }
            log.info(
                "%s: %s parameters, %.2f MB, latency %s ms",
                model.name,
                f"{result['size']['parameters']:,}",
                result["size"]["bytes"] / 1e6,
                result["latency_ms"],
            )
            return result
        task = self.tasks[cell.task]
        spec, sections = task["spec"], task["sections"]
        with config_section(f"tasks.{cell.task}"):
            if cell.kind == "predict":
                metrics = predict_scores(model, sections, spec["split"], self.cfg.batch_size)
            elif cell.kind == "probe":
                metrics = probe_scores(
                    model, sections, spec["split"], spec["probe_c"], self.cfg.batch_size, spec["max_train_rows"]
                )
            else:
                metrics = similarity_scores(model, sections, spec["split"], self.cfg.batch_size)
        log.info("%s: %s", cell.label(), ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return {"metrics": metrics, "seconds": round(time.perf_counter() - started, 2)}

    def _finetune(self, cell: Cell, path: str) -> Dict[str, Any]:
        """One fine-tuning run, by the fine-tuning recipe itself; an interrupted one resumes."""
        run_dir = cell.run_dir(self.output_dir)
        resume = run_dir.is_dir() and bool(list_checkpoints(run_dir))
        if run_dir.is_dir() and not resume:  # began but saved nothing worth keeping: start over
            shutil.rmtree(run_dir)
        cfg = finetune_config(
            self.tasks[cell.task]["settings"],
            cell,
            str(path),
            run_dir,
            resume_from_checkpoint=resume,
            device=self.cfg.device,
            dtype=self.cfg.dtype,
        )
        log.info("Fine-tuning %s%s", cell.label(), " (resuming)" if resume else "")
        started = time.perf_counter()
        recipe = FinetuneRecipe(OmegaConf.create(cfg))
        try:
            recipe.setup()
            recipe.train()
        except RunInterrupted as e:
            where = str(e).split(". Run the same command")[0]  # the fine-tuning run's own advice does not apply
            raise RunInterrupted(
                f"Evaluation stopped in cell {cell.label()} ({where}). Run the same command again: finished cells "
                "are kept and this one resumes from its checkpoint",
                e.exit_code,
            ) from None
        finally:
            recipe.cleanup()
            set_write_root(self.output_dir)  # the fine-tuning run confined writes to its own folder
        self.stop_signal = recipe.run.stop_signal  # a stop asked for after the cell's last step
        best = recipe.best
        return {
            "metrics": best["metrics"],
            "best_step": best["step"],
            "steps": recipe.max_steps,
            "seconds": round(time.perf_counter() - started, 2),
        }

    # ------------------------------------------------------------------ report
    def _report(self, info: Dict[str, Dict[str, Any]], finished: List[Dict[str, Any]], seconds: float) -> None:
        summary = summarize(info, self.columns, finished, self.cfg.reference)
        summary["config"] = OmegaConf.to_container(self.cfg)
        title = f"Evaluation: {Path(self.cfg.output_dir).name}"
        notes = [
            "Scores x 100 on each task's "
            + ", ".join(sorted({t["spec"]["split"] for t in self.tasks.values()}))
            + " split; "
            "fine-tuning: the best learning rate's mean over seeds (± standard error when several seeds).",
            f"Latency: median of {self.cfg.latency.repeats} fp32 forward passes on {torch.get_num_threads()} CPU threads "
            "(ONNX Runtime for int8 exports), random token ids, batch x sequence length.",
            "—: not measured (an int8 export is not fine-tuned, only evaluated on its features; a bottleneck student takes no adapters).",
        ]
        write_json(self.output_dir / "results.json", summary)
        table = markdown(summary, self.columns, title, notes)
        with atomic_file(self.output_dir / "report.md", "report") as f:
            f.write(table)
        picture = plot(summary, self.output_dir / "report.png", title)
        log.info(
            "Evaluation finished in %.0f s: %s, %s%s",
            seconds,
            self.output_dir / "report.md",
            self.output_dir / "results.json",
            f", {picture}" if picture else "",
        )
        print(table)

    def cleanup(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        set_write_root(None)
        if self.lock is not None:
            self.lock.close()
            self.lock = None


@parse
def recipe_main(cfg: DictConfig) -> None:
    configure_logging()
    execute(EvaluateRecipe(cfg))


if __name__ == "__main__":
    sys.exit(recipe_main())
