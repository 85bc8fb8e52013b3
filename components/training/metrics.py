"""Metric sinks: TensorBoard events plus a ``metrics.jsonl`` line per logged step."""

import json
import math
import time
from pathlib import Path
from typing import Mapping, Optional

from components.checkpointing.io import atomic_file, check_write_path


class MetricLogger:
    """Writes scalars to TensorBoard (``<dir>/tensorboard``) and to ``<dir>/metrics.jsonl``.

    On resume pass ``purge_step`` (the first step the resumed run will log): what an
    interrupted run logged from that step on is dropped, from TensorBoard (its ``purge_step``)
    and from ``metrics.jsonl`` (rewritten atomically, also dropping a line cut by a kill), so
    both hold each step once.
    """

    def __init__(self, output_dir: Path, purge_step: Optional[int] = None, enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        log_dir = check_write_path(Path(output_dir) / "tensorboard", "TensorBoard logs")
        path = check_write_path(Path(output_dir) / "metrics.jsonl", "metrics")
        if purge_step is not None and path.exists():
            _truncate_jsonl(path, purge_step)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.jsonl = open(path, "a", encoding="utf-8")

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
