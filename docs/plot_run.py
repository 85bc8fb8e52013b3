"""Draw the curves worth watching from a run's ``metrics.jsonl`` into one PNG.

    pip install matplotlib
    python docs/plot_run.py <output_dir> [--out run.png] [--title "..."]

The picture in docs/watching.md ("Watching a run") is this script on a tiny run (see its caption).
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path


def read(path: Path):
    series = defaultdict(dict)  # name -> {step: value}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for name, value in record.items():
            if name not in ("step", "time") and isinstance(value, (int, float)):
                series[name][record["step"]] = value
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("run.png"))
    parser.add_argument("--title", default=None, help="defaults to the output_dir's name")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read(args.output_dir / "metrics.jsonl")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)

    def plot(ax, names, title, log=False):
        for name in names:
            steps = sorted(series[name])
            ax.plot(
                steps,
                [series[name][s] for s in steps],
                label=name.split("/", 1)[-1],
                marker="." if name.startswith("eval/") else None,
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

    plot(axes[0, 0], sorted(n for n in series if n.startswith("loss/")), "training loss terms (weighted)", log=True)
    plot(
        axes[0, 1],
        sorted(n for n in series if n.startswith("eval/alignment_cosine/")),
        "held-out alignment cosine per mapped pair",
    )
    plot(
        axes[1, 0],
        [n for n in ("eval/student_mlm_loss", "eval/teacher_mlm_loss") if n in series],
        "held-out MLM loss: student vs teacher",
    )
    ax = axes[1, 1]
    plot(ax, ["tokens_per_second"], "throughput and learning rate")
    twin = ax.twinx()
    steps = sorted(series["lr"])
    twin.plot(steps, [series["lr"][s] for s in steps], color="tab:red", label="lr")
    twin.set_ylabel("lr", color="tab:red")
    fig.suptitle(args.title or f"{args.output_dir.name}: metrics.jsonl", fontsize=10)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
