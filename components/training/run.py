"""The bookkeeping every recipe shares, so that a recipe keeps only its own loop.

A ``Run`` owns a recipe's ``output_dir``:

* **The folder.** The main rank locks it (``.lock``) for the run's lifetime, cleans up what an
  interrupted write left, and refuses a folder that already holds a run unless the run resumes.
  Every write is confined to it (``components.io.set_write_root``).
* **Resume.** The main rank chooses the newest checkpoint that verifies (size + SHA-256; damaged
  ones are set aside) and every rank loads that one. The saved config is compared with the new
  one: keys that decide the model or the data order must match. So are the fingerprints of the
  corpus and the teacher (``Run.identify``), unless ``allow_changes_on_resume`` names them.
* **Ranks agree.** ``Run.check_ranks_agree`` compares every rank's config, data and
  teacher with rank 0's before step 1.
* **Checkpoints.** The recipe hands over its own state (model, optimizer, schedule, ...); the
  run adds the step, the config and every rank's random state, and the main rank writes it
  atomically, keeping the newest ``keep_last`` checkpoints.
* **Length.** ``Run.plan_steps``: ``max_steps``, else ``epochs`` epochs; a resumed run
  counted in epochs keeps the step count it began with.
* **Signals.** SIGTERM (a scheduler's preemption) or Ctrl-C asks the run to stop after the
  current step: ``Run.poll_stop`` tells the recipe's loop, the recipe checkpoints and
  ``Run.interrupt`` raises ``RunInterrupted`` (exit status 128 +
  signal). A second Ctrl-C stops at once. Every rank stops after the same step: the request
  travels in a collective.
* **Main-rank writes.** ``Run.on_main`` runs a write on the main rank (checkpoints, the
  student, metric lines through ``Run.log``); if it fails, even by Ctrl-C, every rank
  raises with its error (none waits forever in the next collective).
* **Metrics.** ``Run.open_metrics`` opens the metric logger (``metrics.jsonl`` plus
  TensorBoard or the config's ``metric_logger``), dropping whatever an interrupted run logged
  after its last checkpoint; ``Run.profiler`` and ``Run.memory_stats`` serve the
  config's ``profiler`` and ``log_peak_memory_stats``.
"""

import contextlib
import functools
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from components.checkpointing.resume import (
    checkpoint_path,
    checkpoints_dir,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from components.config import config_differences, instantiate
from components.errors import CheckpointError, ConfigError, MissingDependencyError, RunInterrupted, UserError
from components.fingerprint import fingerprint_differences
from components.io import atomic_file, lock_output_dir, recover_interrupted_writes, set_write_root
from components.training.metrics import MetricLogger, peak_memory_stats

log = logging.getLogger(__name__)


# Config keys (and the keys under them) that may change on resume when the fingerprint they
# name is unchanged: a corpus, a teacher or a model moved to another folder is the same one.
MOVABLE = {"data.source": "data", "teacher.path": "teacher", "checkpoint_dir": "model"}


def _movable(key: str) -> Optional[str]:
    """The fingerprint that decides whether config ``key`` may change on resume, if any."""
    return next((name for prefix, name in MOVABLE.items() if key == prefix or key.startswith(prefix + ".")), None)


class Run:
    """One recipe run in one ``output_dir``, on every rank of ``parallel``.

    Args:
        cfg: the checked config (saved with every checkpoint and as ``config.yaml``).
        parallel: the recipe's ``SingleDevice`` / ``DataParallel`` strategy.
        must_match: top-level (or dotted) config keys a resumed run may not change: those that
            decide the model and the data order.
        may_change: dotted keys under ``must_match`` that may change all the same.
        outputs: names under ``output_dir`` that a finished run leaves (besides checkpoints):
            a new run refuses a folder holding any of them.
    """

    def __init__(
        self,
        cfg: DictConfig,
        parallel,
        must_match: Sequence[str],
        may_change: Sequence[str] = (),
        outputs: Sequence[str] = (),
    ):
        self.cfg = cfg
        self.parallel = parallel
        self.output_dir = Path(cfg.output_dir)
        self.must_match, self.may_change, self.outputs = tuple(must_match), tuple(may_change), tuple(outputs)
        self.saved_step: Optional[int] = None  # step of the newest checkpoint on disk
        self.saved_path: Optional[Path] = None
        self.stop_signal: Optional[int] = None  # SIGTERM / SIGINT received by this rank
        self.max_steps: Optional[int] = None  # the run's length (plan_steps)
        self._began_with: Optional[Tuple[Optional[int], Optional[int]]] = None  # a resumed run's (max_steps, epochs)
        self.metrics: Optional[MetricLogger] = None
        self.fingerprints: Dict[str, Any] = {}  # what the run trains on (see identify)
        self._moved: Dict[str, Tuple[Any, Any]] = {}  # MOVABLE keys a resume changed
        self._lock = None

    @property
    def is_main(self) -> bool:
        return self.parallel.is_main

    # ------------------------------------------------------------------ start
    def start(self) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """Lock and check ``output_dir``; on resume, (path, state) of the checkpoint every rank
        continues from (``None`` for a new run). Call before building anything big."""
        decision = None
        if self.is_main:
            try:
                decision = {"path": self._choose_checkpoint()}
            except UserError as e:
                decision = {"error": (type(e), str(e))}
        decision = self.parallel.broadcast_object(decision)
        if "error" in decision:
            kind, message = decision["error"]
            raise kind(message)
        set_write_root(self.output_dir)  # nothing a config names may write outside it
        if decision["path"] is None:
            return None
        path, problem = Path(decision["path"]), None
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            problem = e
        if self.parallel.any(problem is not None):
            raise problem or CheckpointError(
                f"Another rank could not read {path}: output_dir must be on a filesystem every rank can read"
            )
        self._check_resumed_config(path, state)
        self._began_with = (state.get("max_steps"), (state.get("config") or {}).get("epochs"))
        return path, state

    def _choose_checkpoint(self) -> Optional[str]:
        self._lock = claim_output_dir(self.output_dir, checkpoints_dir(self.output_dir))
        if not self.cfg.resume_from_checkpoint:
            if list_checkpoints(self.output_dir) or any((self.output_dir / name).exists() for name in self.outputs):
                raise ConfigError(
                    f"output_dir {self.output_dir} already holds a run. Continue it with "
                    "resume_from_checkpoint=True, or choose another output_dir"
                )
            return None
        found = load_latest_checkpoint(self.output_dir)
        if found is None:
            left = self._run_outputs()
            if left:
                raise CheckpointError(
                    f"resume_from_checkpoint=True, but {self.output_dir} has no checkpoint to resume from while it "
                    f"holds a run's outputs ({', '.join(left)}): starting over would replace them. Move them away, "
                    "or choose another output_dir"
                )
            log.warning("resume_from_checkpoint=True but %s has no checkpoint: starting at step 0", self.output_dir)
            return None
        return str(found[0])

    def _run_outputs(self) -> List[str]:
        """What a finished or interrupted run left in ``output_dir`` besides usable checkpoints."""
        out = self.output_dir
        left = [f"{name}/" if (out / name).is_dir() else name for name in self.outputs if (out / name).exists()]
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and metrics.stat().st_size > 0:
            left.append("metrics.jsonl")
        if (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir()):
            left.append("tensorboard/")
        damaged = (
            sorted(p.name for p in checkpoints_dir(out).glob("damaged-*")) if checkpoints_dir(out).is_dir() else []
        )
        left += [f"checkpoints/{name} (damaged)" for name in damaged]
        return left

    def _check_resumed_config(self, path: Path, state: Dict[str, Any]) -> None:
        saved_world = state.get("world_size", 1)
        if saved_world != self.parallel.world_size:
            raise ConfigError(
                f"Checkpoint {path} was written by {saved_world} process(es); resume it with the same number"
            )
        if state.get("config") is None:
            return
        changed = config_differences(state["config"], OmegaConf.to_container(self.cfg))
        fatal = {
            k: v
            for k, v in changed.items()
            if any(k == m or k.startswith(m + ".") for m in self.must_match) and k not in self.may_change
        }
        # a moved corpus or teacher is judged by its fingerprint, once the recipe has taken it
        self._moved = {k: v for k, v in fatal.items() if _movable(k)}
        fatal = {k: v for k, v in fatal.items() if not _movable(k)}
        if fatal:
            raise ConfigError(
                f"Checkpoint {path} was written by a run with different "
                + ", ".join(f"{k} ({old!r}, now {new!r})" for k, (old, new) in fatal.items())
                + ": resuming would change the model or the data order. Use the original values"
            )
        for key, (old, new) in changed.items():
            if key not in self._moved:
                log.warning("Resuming with %s changed: %r in the checkpoint, %r now", key, old, new)

    def plan_steps(self, max_steps: Optional[int], epochs: int, steps_per_epoch: int) -> int:
        """The run's length in optimizer steps (also ``max_steps``, saved with every
        checkpoint): ``max_steps``, else ``epochs`` epochs of ``steps_per_epoch``. A resumed run
        counted in epochs keeps the count it began with: its schedule and stages were laid out
        over it, and an accepted data change (``allow_changes_on_resume``) may have moved the
        steps per epoch."""
        steps = max_steps or epochs * steps_per_epoch
        if not max_steps and self._began_with is not None:
            saved, saved_epochs = self._began_with
            if saved is not None and saved_epochs == epochs and saved != steps:
                log.warning(
                    "epochs=%d now means %d steps, %d when the run began: keeping %d", epochs, steps, saved, saved
                )
                steps = saved
        self.max_steps = steps
        return steps

    def identify(self, **fingerprints: Any) -> None:
        """Record what the run trains on (``data=``, and ``teacher=`` or ``model=``, the checkpoint
        fine-tuning starts from: see ``components.fingerprint``). Every checkpoint keeps them;
        ``resumed`` refuses a checkpoint written on others, unless ``allow_changes_on_resume``
        names them."""
        self.fingerprints.update({k: v for k, v in fingerprints.items() if v is not None})

    def _check_fingerprints(self, path: Path, state: Dict[str, Any]) -> None:
        allowed = set(self.cfg.get("allow_changes_on_resume") or ())
        saved = state.get("fingerprints") or {}
        for key, (old, new) in self._moved.items():
            if _movable(key) not in saved or _movable(key) not in self.fingerprints:
                raise ConfigError(
                    f"Checkpoint {path} was written by a run with {key}={old!r}, now {new!r}, and there is no "
                    "fingerprint to tell whether it holds the same thing. Use the original value"
                )
            log.info("%s moved from %r to %r; its fingerprint is checked below", key, old, new)
        for name, now in self.fingerprints.items():
            if name not in saved:
                continue  # a checkpoint from before fingerprints were recorded
            changes = fingerprint_differences(saved[name], now)
            if not changes:
                continue
            detail = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
            if name in allowed:
                log.warning("Resuming with a changed %s, as allow_changes_on_resume says: %s", name, detail)
                continue
            raise CheckpointError(
                f"Checkpoint {path} was written on another {name}: {detail}. Resuming would silently "
                f"train on something else. Restore the original {name}, or accept the change with "
                f"'allow_changes_on_resume=[{name}]'"
            )

    def check_ranks_agree(self, facts: Dict[str, Any]) -> None:
        """Before step 1: every rank must hold what rank 0 holds (resolved config, data,
        teacher, window counts). A difference is an error on every rank naming the rank and
        the key, instead of a hang when a collective later disagrees."""
        if self.parallel.world_size == 1:
            return
        main = self.parallel.broadcast_object(facts)
        differing = [key for key in facts if facts[key] != main.get(key)]
        reports = [r for r in self.parallel.gather_objects((self.parallel.rank, differing)) if r[1]]
        if reports:
            mine = ""
            if differing:
                key = differing[0]
                mine = f" Here (rank {self.parallel.rank}) {key} is {_short(facts[key])}, on rank 0 {_short(main.get(key))}."
            raise ConfigError(
                "The ranks disagree before step 1: "
                + "; ".join(f"rank {rank} differs from rank 0 in {', '.join(keys)}" for rank, keys in reports)
                + "."
                + mine
                + " Every rank must see the same config, corpus and teacher (shared files, same versions)"
            )

    def resumed(self, path: Path, state: Dict[str, Any]) -> int:
        """Check the checkpoint's fingerprints against ``identify``'s, restore this rank's
        random state; returns its step."""
        self._check_fingerprints(path, state)
        self.saved_step, self.saved_path = int(state["step"]), path
        rng = state["rng"][self.parallel.rank]
        torch.set_rng_state(rng["torch"])
        device = self.parallel.device
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        log.info("Resumed from %s at step %d", path, self.saved_step)
        return self.saved_step

    def open_metrics(self, next_step: int) -> MetricLogger:
        """The metric logger (main rank only writes), dropping what an interrupted run logged
        from ``next_step`` on; also writes the resolved ``config.yaml``. Its dashboard is the
        config's ``metric_logger`` (any torchtune metric logger) or TensorBoard."""
        sink = None
        if self.is_main and self.cfg.get("metric_logger") is not None:
            sink = instantiate_optional("metric_logger", self.cfg.metric_logger)
            if hasattr(sink, "log_config"):  # WandB and MLflow record the run's config
                sink.log_config(self.cfg)
        self.metrics = MetricLogger(self.output_dir, purge_step=next_step, enabled=self.is_main, sink=sink)
        if self.is_main:
            with atomic_file(self.output_dir / "config.yaml", "config") as f:
                f.write(OmegaConf.to_yaml(self.cfg))
        return self.metrics

    def memory_stats(self) -> Dict[str, float]:
        """Peak CUDA memory since the last call (``log_peak_memory_stats``), else nothing."""
        if not self.cfg.get("log_peak_memory_stats", False):
            return {}
        return dict(peak_memory_stats(self.parallel.device))

    def profiler(self):
        """The config's ``profiler`` (torchtune's ``setup_torch_profiler``) as a context manager
        whose ``step()`` the recipe calls after every optimizer step; a no-op when it is absent
        or disabled. Traces go to ``<output_dir>/profiling/`` unless it names another folder."""
        from torchtune.training import DummyProfiler

        node = self.cfg.get("profiler")
        if node is None or not node.get("enabled", False):
            return DummyProfiler()
        node = OmegaConf.to_container(node, resolve=True)
        node.setdefault("output_dir", str(self.output_dir / "profiling"))
        if self.parallel.device.type != "cuda":  # profile what there is
            node["cuda"] = node["xpu"] = False
        profiler = instantiate_optional("profiler", node)
        profiler = profiler[0] if isinstance(profiler, tuple) else profiler  # setup_torch_profiler: (profiler, cfg)
        if self.parallel.device.type != "cuda" and isinstance(profiler, torch.profiler.profile):
            # torchtune's trace handler ranks ops by CUDA time, which is all zeros here
            from torchtune.training._profiler import trace_handler

            profiler.on_trace_ready = functools.partial(
                trace_handler, output_dir=node["output_dir"], metric="self_cpu_time_total"
            )
        log.info("Profiling into %s", node["output_dir"])
        return profiler

    # ------------------------------------------------------------------ during the run
    def save_checkpoint(self, step: int, state: Dict[str, Any]) -> Path:
        """Write ``state`` (full state dicts, the same on every rank or gathered on the main
        one) for ``step``. Every rank calls it: random states are gathered."""
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.parallel.device) if self.parallel.device.type == "cuda" else None,
        }
        state = {
            **state,
            "step": step,
            "max_steps": self.max_steps,
            "world_size": self.parallel.world_size,
            "config": OmegaConf.to_container(self.cfg),
            "fingerprints": self.fingerprints,
            "rng": [
                {k: v.cpu() if v is not None else None for k, v in r.items()} for r in self.parallel.gather_objects(rng)
            ],
        }
        keep = self.cfg.keep_last_n_checkpoints
        self.on_main(lambda: save_checkpoint(self.output_dir, step, state, keep))
        self.saved_step, self.saved_path = step, checkpoint_path(self.output_dir, step)
        log.info("Saved checkpoint %s", self.saved_path)
        return self.saved_path

    def on_main(self, write: Callable[[], Any]) -> None:
        """Run a write on the main rank; if it fails (Ctrl-C included), every rank raises with
        the main rank's error, so none waits forever in the next collective."""
        error = None
        if self.is_main:
            try:
                write()
            except BaseException as e:  # noqa: B036 - the other ranks must hear of it, then it propagates
                error = e
        if self.parallel.world_size == 1:
            if error is not None:
                raise error
            return
        message = self.parallel.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise CheckpointError(f"Stopping: rank 0 failed to write ({message})")

    def log(self, metrics: Dict[str, float], step: int) -> None:
        """Log scalars (the main rank writes them; a failed write stops every rank)."""
        self.on_main(lambda: self.metrics.log(metrics, step))

    def poll_stop(self, agreed: Optional[bool] = None) -> bool:
        """Whether the run stops after this step: whether any rank received a stop signal. Call
        it after every step, on every rank: it is a collective, unless the step already agreed
        on it in its own (``agreed``: ``distill_step`` folds the ranks' stop flags into the
        reduction of its losses)."""
        return bool(agreed) if agreed is not None else self.parallel.any(self.stop_signal is not None)

    def interrupt(self, step: int, total: int, checkpoint: Callable[[], Path]) -> None:
        """Stop after ``step``: ``checkpoint()`` (unless this step is saved) and raise
        ``RunInterrupted``. Every rank calls it after the same step."""
        path = checkpoint() if self.saved_step != step else self.saved_path
        signum = self.stop_signal or signal.SIGTERM  # another rank got the signal
        raise RunInterrupted(
            f"Stopped by {signal.Signals(signum).name} after step {step} of {total}; "
            f"checkpoint {path}. Run the same command with resume_from_checkpoint=True to continue",
            signum,
        )

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """SIGTERM or Ctrl-C request a stop after the current step; a second Ctrl-C stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.getsignal(s) for s in signals}

        def request_stop(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = signum
            log.warning("%s: stopping after this step with a checkpoint", signal.Signals(signum).name)

        for s in signals:
            signal.signal(s, request_stop)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        set_write_root(None)
        self.parallel.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def claim_output_dir(folder: Path, *inner: Path):
    """Make ``folder`` this process's: create it, lock it (``.lock``, held until the returned
    lock is closed), confine writes to it, and clean up what interrupted writes left in it (and
    in the ``inner`` folders). Every recipe's output folder goes through here."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_output_dir(folder)
    set_write_root(folder)
    for where in (folder, *inner):
        for note in recover_interrupted_writes(where):
            log.warning("Cleaning up after an interrupted run: %s", note)
    return lock


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def instantiate_optional(section: str, node):
    """Instantiate an observability component; a missing package (wandb, mlflow) is one line."""
    try:
        return instantiate(node)
    except ImportError as e:
        target = node.get("_component_", section)
        raise MissingDependencyError(f"{section}: {target} needs a package that is not installed ({e})") from e


def execute(recipe):
    """How every recipe is driven, by ``tune run``, the tests and the benchmarks alike:
    ``setup()``, ``train()``, and ``cleanup()`` whatever happens. Returns the recipe."""
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


def configure_logging() -> None:
    """Log lines on stdout, with time and source: what the recipes print."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
