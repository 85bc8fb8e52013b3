"""The table of an evaluation: models as rows, tasks as columns, the average, the percentage of
the reference model, and size and latency beside them; as ``results.json``, ``report.md`` and a
picture (``report.png``: quality against latency and against size).

Fine-tuning cells of one model, task and tuning are grouped by learning rate: each rate's score
is the mean over its seeds, the best rate's mean is reported (as MiniALBERT and BERT pick a
rate on the dev set), with the standard error over seeds (sample standard deviation / sqrt(n))
when there are several.
"""

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from components.inference.task_metrics import LOWER_IS_BETTER
from components.io import atomic_file


@dataclass(frozen=True)
class Column:
    task: str
    kind: str
    metrics: Tuple[str, ...]  # one, or several shown together (GLUE's F1/accuracy); the score is their mean
    tuning: Optional[str] = None
    show_tuning: bool = False  # the task has several tunings: name each column's

    @property
    def key(self) -> str:
        return f"{self.task}/{self.tuning}" if self.show_tuning else self.task

    @property
    def header(self) -> str:
        what = self.tuning if self.show_tuning else {"finetune": "", "probe": "", "similarity": ""}[self.kind]
        return f"{self.task}{' ' + what if what else ''} ({'/'.join(self.metrics)})"


def _stderr(values: Sequence[float]) -> Optional[float]:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def _value(column: Column, metrics: Mapping[str, float]) -> float:
    return statistics.mean(metrics[m] for m in column.metrics)


def _rate(lr: Optional[float]) -> str:
    return "as given" if lr is None else f"{lr:g}"  # None: a fine-tuned model scored as it is


def column_score(column: Column, cells: List[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """The reported score of one model in one column, from its finished cells (None: none):
    ``value`` (the mean of the column's metrics) and ``metrics`` (each of them)."""
    mine = [c for c in cells if c["task"] == column.task and c.get("tuning") == column.tuning and c.get("metrics")]
    if not mine:
        return None
    if column.kind != "finetune":
        metrics = mine[0]["metrics"]
        return {"value": _value(column, metrics), "metrics": {m: metrics[m] for m in column.metrics}, "n": 1}
    by_lr: Dict[float, List[Mapping[str, float]]] = {}
    for c in mine:
        by_lr.setdefault(c["lr"], []).append(c["metrics"])
    sign = -1 if column.metrics[0] in LOWER_IS_BETTER else 1
    lr, runs = max(by_lr.items(), key=lambda item: sign * statistics.mean(_value(column, m) for m in item[1]))
    values = [_value(column, m) for m in runs]
    return {
        "value": statistics.mean(values),
        "metrics": {m: statistics.mean(r[m] for r in runs) for m in column.metrics},
        "stderr": _stderr(values),
        "n": len(values),
        "lr": lr,
        "seeds": sorted(c["seed"] for c in mine if c["lr"] == lr and c["seed"] is not None),
        "by_lr": {_rate(k): statistics.mean(_value(column, m) for m in v) for k, v in by_lr.items()},
    }


def summarize(
    models: Mapping[str, Mapping[str, Any]],
    columns: List[Column],
    cells: List[Mapping[str, Any]],
    reference: Optional[str],
) -> Dict[str, Any]:
    """``results.json``'s content: per model, the columns' scores, the average, the percentage
    of the reference (the mean over the model's columns of score / reference score), and its
    size and latency (``models``: name -> {path, kind, parameters, bytes, latency_ms})."""
    rows = {}
    for name, info in models.items():
        mine = [c for c in cells if c["model"] == name]
        scores = {col.key: column_score(col, mine) for col in columns}
        present = [s["value"] for s in scores.values() if s is not None]
        rows[name] = {
            **info,
            "scores": scores,
            "average": statistics.mean(present) if present else None,
            "columns_scored": len(present),
        }
    if reference is not None and reference in rows:
        ref = rows[reference]
        for row in rows.values():
            ratios = {
                k: s["value"] / ref["scores"][k]["value"]
                for k, s in row["scores"].items()
                if s is not None and ref["scores"].get(k) and ref["scores"][k]["value"]
            }
            row["of_reference"] = {
                "scores": ratios,
                "average": statistics.mean(ratios.values()) if ratios else None,
                "parameters": row["parameters"] / ref["parameters"] if ref.get("parameters") else None,
                "bytes": row["bytes"] / ref["bytes"] if ref.get("bytes") else None,
                "latency_ms": {
                    k: v / ref["latency_ms"][k]
                    for k, v in row.get("latency_ms", {}).items()
                    if ref["latency_ms"].get(k)
                },
            }
    return {
        "reference": reference,
        "columns": [
            {"key": c.key, "task": c.task, "kind": c.kind, "tuning": c.tuning, "metrics": list(c.metrics)}
            for c in columns
        ],
        "models": rows,
    }


def _score(s: Optional[Mapping[str, Any]]) -> str:
    if s is None:
        return "—"
    text = "/".join(f"{100 * v:.1f}" for v in s["metrics"].values())
    if s.get("stderr") is not None:
        text += f" ± {100 * s['stderr']:.1f}"
    return text


def _percent(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def markdown(summary: Mapping[str, Any], columns: List[Column], title: str, notes: Sequence[str] = ()) -> str:
    """report.md: the table a paper prints (scores x 100), then the same as % of the reference."""
    rows = summary["models"]
    shapes = sorted(
        {k for r in rows.values() for k in r.get("latency_ms", {})}, key=lambda s: [int(x) for x in s.split("x")]
    )
    head = ["model", *[c.header for c in columns], "average", "params (M)", "size (MB)", *[f"ms {s}" for s in shapes]]
    reference = summary.get("reference")
    if reference:
        head.insert(len(columns) + 2, f"% of {reference}")
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        cells = [name + (f" ({row['kind']})" if row.get("kind") == "onnx" else "")]
        cells += [_score(row["scores"][c.key]) for c in columns]
        average = "—" if row["average"] is None else f"{100 * row['average']:.1f}"
        if row["average"] is not None and row["columns_scored"] < len(columns):
            average += f" ({row['columns_scored']}/{len(columns)})"
        cells.append(average)
        if reference:
            cells.append(_percent((row.get("of_reference") or {}).get("average")))
        cells.append("—" if row.get("parameters") is None else f"{row['parameters'] / 1e6:.2f}")
        cells.append("—" if row.get("bytes") is None else f"{row['bytes'] / 1e6:.2f}")
        cells += [f"{row['latency_ms'][s]:.1f}" if s in row.get("latency_ms", {}) else "—" for s in shapes]
        lines.append("| " + " | ".join(cells) + " |")
    if reference and reference in rows:
        lines += ["", f"As a percentage of {reference}:", ""]
        head = ["model", *[c.header for c in columns], "average", "params", "size", *[f"ms {s}" for s in shapes]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, row in rows.items():
            ratio = row.get("of_reference") or {}
            cells = [
                name,
                *[_percent(ratio.get("scores", {}).get(c.key)) for c in columns],
                _percent(ratio.get("average")),
            ]
            cells += [_percent(ratio.get("parameters")), _percent(ratio.get("bytes"))]
            cells += [_percent(ratio.get("latency_ms", {}).get(s)) for s in shapes]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def plot(summary: Mapping[str, Any], path: Path, title: str) -> Optional[Path]:
    """report.png: the average score against latency (the largest measured shape) and against
    size on disk, one labelled point per model. None when no model has an average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {n: r for n, r in summary["models"].items() if r.get("average") is not None}
    if not rows:
        return None
    shapes = sorted(
        {k for r in rows.values() for k in r.get("latency_ms", {})}, key=lambda s: [int(x) for x in s.split("x")]
    )
    panels = ([("latency_ms", shapes[-1], f"CPU latency, batch {shapes[-1]} (ms)")] if shapes else []) + [
        ("bytes", None, "size on disk (MB)")
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (what, shape, label) in zip(axes[0], panels):
        for name, row in rows.items():
            x = row.get(what, {}).get(shape) if shape else (row.get(what) or 0) / 1e6
            if x is None:
                continue
            marker = "s" if row.get("kind") == "onnx" else "o"
            ax.scatter([x], [100 * row["average"]], s=60, marker=marker, zorder=3)
            ax.annotate(name, (x, 100 * row["average"]), textcoords="offset points", xytext=(6, 4), fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel("average score (x100)")
        ax.grid(True, which="both", alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_file(path, "report picture", mode="wb") as f:
        figure.savefig(f, format="png", dpi=110)
    plt.close(figure)
    return path


def write_json(path: Path, content: Mapping[str, Any]) -> None:
    with atomic_file(path, "results") as f:
        f.write(json.dumps(content, indent=2) + "\n")
