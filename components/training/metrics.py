"""Metric sinks: a ``metrics.jsonl`` line per logged step, plus a dashboard.

The dashboard is TensorBoard (``<output_dir>/tensorboard``) unless the config's
``metric_logger:`` names another one: any torchtune metric logger
(``torchtune.training.metric_logging.DiskLogger``, ``WandBLogger``, ``MLFlowLogger``,
``TensorBoardLogger``...) or anything with the same ``log_dict(payload, step)`` / ``close()``
methods, so a ``metric_logger:`` block pasted from a torchtune config works unchanged.
"""

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from components.io import atomic_file, check_write_path


class TensorBoardSink:
    """The default dashboard: TensorBoard events in ``log_dir``, with what an interrupted run
    logged from ``purge_step`` on hidden (TensorBoard's own ``purge_step``)."""

    def __init__(self, log_dir: Path, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(check_write_path(Path(log_dir), "TensorBoard logs")), purge_step=purge_step
        )

    def log_dict(self, payload: Mapping[str, float], step: int) -> None:
        for name, value in payload.items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class MetricLogger:
    """Writes scalars to ``<dir>/metrics.jsonl`` and to a dashboard (``sink``; TensorBoard under
    ``<dir>/tensorboard`` when ``None``).

    On resume pass ``purge_step`` (the first step the resumed run will log): what an interrupted
    run logged from that step on is dropped from ``metrics.jsonl`` (rewritten atomically, also
    dropping a line cut by a kill) and hidden in TensorBoard, so both hold each step once. Other
    dashboards keep their own history (a resumed WandB run shows the replayed steps again).
    """

    def __init__(self, output_dir: Path, purge_step: Optional[int] = None, enabled: bool = True, sink: Any = None):
        self.enabled = enabled
        self.sink = None
        self.jsonl = None
        if not enabled:
            return
        path = check_write_path(Path(output_dir) / "metrics.jsonl", "metrics")
        if purge_step is not None and path.exists():
            _truncate_jsonl(path, purge_step)
        self.sink = sink if sink is not None else TensorBoardSink(Path(output_dir) / "tensorboard", purge_step)
        self.jsonl = open(path, "a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        self.sink.log_dict(dict(metrics), step)
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()})
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.jsonl.close()
            self.sink = self.jsonl = None


def peak_memory_stats(device: torch.device) -> Mapping[str, float]:
    """Peak CUDA memory since the last call, in GiB (``memory/peak_*``), then reset; empty off
    CUDA (torchtune's ``log_peak_memory_stats``)."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    gib = 1024**3
    out = {
        "memory/peak_active_gib": stats.get("active_bytes.all.peak", 0) / gib,
        "memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
        "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
    }
    torch.cuda.reset_peak_memory_stats(device)
    return out


def _truncate_jsonl(path: Path, purge_step: int) -> None:
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the last line of a killed run may be cut short
        if isinstance(record, dict) and record.get("step", purge_step) < purge_step:
            kept.append(line)
    with atomic_file(path, "metrics") as f:
        f.write("".join(line + "\n" for line in kept))
