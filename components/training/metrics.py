"""Metric sinks: TensorBoard events plus a ``metrics.jsonl`` line per logged step."""

import json
import math
import time
from pathlib import Path
from typing import Mapping, Optional


class MetricLogger:
    """Writes scalars to TensorBoard (``<dir>/tensorboard``) and to ``<dir>/metrics.jsonl``.

    On resume pass ``purge_step``: TensorBoard then hides events at or after it that an
    interrupted run had written, so curves stay single-valued. ``metrics.jsonl`` keeps every
    line; readers should take the last line of each step.
    """

    def __init__(self, output_dir: Path, purge_step: Optional[int] = None, enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=purge_step)
        self.jsonl = open(Path(output_dir) / "metrics.jsonl", "a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()})
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()
            self.writer = self.jsonl = None
