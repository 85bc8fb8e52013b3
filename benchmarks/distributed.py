"""Distributed distillation on this machine: teacher memory per rank and throughput, N=1 vs N=2.

    python benchmarks/distributed.py [--rounds 2] [--steps 4] [--seq 128] [--global-batch 8] [--out FILE]

1. A BERT-large-shaped teacher (24 layers, H=1024, 16 heads, FFN 4096, vocab 30522; random
   weights from a config, saved once in Hugging Face format under benchmarks/results/.cache)
   is loaded by the distributed recipe's code path (meta device, FSDP2, shard by shard) at
   world size 1 and 2. Each rank reports the bytes of the teacher parameters it holds and the
   peak growth of its anonymous memory (RssAnon, sampled every millisecond) while loading:
   the memory-mapped checkpoint's pages are left out, as they are page cache, not allocations.
2. Distillation steps of that teacher into bert_large.yaml's student (E=128, H=1024, 16 heads,
   6 iterations, adapters) on synthetic windows, same global batch at N=1 and N=2: tokens/s.
3. At N=2, the recipe's FSDP2 student against a replicated one (gradients all-reduced).

The processes share this machine's cores (torch threads = cores / processes), so on a 2-core
machine N=2 measures the cost of sharding and communication, not scaling across devices.
Writes the raw figures to benchmarks/results/distributed.json (or --out).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / "results" / ".cache" / "bert-large-random"
LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, vocab_size=30522)


def anon_mb() -> float:
    """Anonymous resident memory of this process (Linux), in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: the peak RSS


class PeakMemory:
    """Samples anon_mb() in a thread; ``growth`` is the peak above the starting value."""

    def __enter__(self):
        self.start, self.peak, self.running = anon_mb(), anon_mb(), True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, anon_mb())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.growth = max(self.peak, anon_mb()) - self.start


def make_teacher() -> Path:
    if (CACHE / "config.json").is_file():
        return CACHE
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    torch.manual_seed(0)
    print("building a random BERT-large-shaped teacher in", CACHE, flush=True)
    model = BertForMaskedLM(BertConfig(**LARGE))
    model.save_pretrained(str(CACHE))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(LARGE["vocab_size"] - 5)]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True).save_pretrained(str(CACHE))
    return CACHE


def worker(args) -> None:
    import torch

    from components.checkpointing import hf_teacher
    from components.losses import DistillationLoss
    from components.models import minialbert_128
    from components.training.distill import distill_step, MaskedBatch
    from components.training.parallel import DataParallel

    parallel = DataParallel("cpu")
    start = time.perf_counter()
    with PeakMemory() as memory:
        teacher = hf_teacher(args.teacher, shard=parallel.shard_teacher)
    load_seconds = time.perf_counter() - start
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in teacher.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    load_peak_growth = memory.growth

    torch.manual_seed(0)
    student = minialbert_128(hidden_size=1024, num_heads=16, intermediate_size=4096, dropout=0.0, attention_dropout=0.0)
    loss_fn = DistillationLoss(student.spec, teacher.spec, attention_reduction="element")
    if args.student == "fsdp":  # what the recipe does
        parallel.shard_student(student)
    params = list(student.parameters()) + list(loss_fn.parameters())
    student_bytes_local = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in student.parameters()
    )
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    share = args.global_batch // parallel.world_size
    g = torch.Generator().manual_seed(parallel.rank)

    def batch() -> MaskedBatch:
        ids = torch.randint(5, LARGE["vocab_size"], (share, args.seq), generator=g)
        labels = torch.full_like(ids, -100)
        where = torch.rand(ids.shape, generator=g) < 0.15
        labels[where] = ids[where]
        ids[where] = 4
        return MaskedBatch(ids, torch.ones_like(ids), labels)

    times = []
    for step in range(args.warmup + args.steps):
        b = batch()
        started = time.perf_counter()
        # the recipe's step: counts over ranks, forward/backward, gradient sync, clip at 1.0, AdamW
        distill_step(student, teacher, loss_fn, [b], params, optimizer, parallel, step=step, max_norm=1.0)
        parallel.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    record = {
        "rank": parallel.rank,
        "world_size": parallel.world_size,
        "threads": torch.get_num_threads(),
        "teacher_bytes_local": local_bytes,
        "teacher_bytes_total": total_bytes,
        "student": args.student,
        "student_bytes_local": student_bytes_local,
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "load_seconds": load_seconds,
        "load_peak_anon_growth_mb": load_peak_growth,
        "step_seconds": times,
        "tokens_per_second": args.global_batch * args.seq / (sorted(times)[len(times) // 2]),
    }
    records = parallel.gather_objects(record)
    if parallel.is_main:
        for r in records:
            print("RESULT " + json.dumps(r), flush=True)
    parallel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="N=1 and N=2 launches per round, order alternating")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "distributed.json"))
    parser.add_argument("--student", choices=["replicated", "fsdp"], default="fsdp", help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-student-comparison", action="store_true", help="skip the replicated-student comparison at N=2"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    teacher = make_teacher()
    results = {1: [], 2: []}

    # Launches run one after the other, so rounds alternate the order (1, 2, then 2, 1, ...)
    # and every round gives its own ratio: load that comes and goes shows as spread.
    def launch(n: int, student: str = "fsdp"):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), __file__,
            "--worker", "--teacher", str(teacher), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--seq", str(args.seq), "--global-batch", str(args.global_batch), "--student", student,
        ]  # fmt: skip
        out = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
        )
        if out.returncode != 0:
            sys.exit(f"world size {n} ({student} student) failed:\n{out.stderr[-4000:]}")
        return [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]

    for round_ in range(args.rounds):
        for n in (1, 2) if round_ % 2 == 0 else (2, 1):
            print(f"round {round_ + 1}: world size {n} ...", flush=True)
            results[n].append(launch(n))
    replicated = None
    if not args.no_student_comparison:
        print("world size 2 with a replicated student, then FSDP2 again ...", flush=True)
        replicated = launch(2, "replicated")
        fsdp_again = launch(2)

    def median(values):
        return statistics.median(values)

    gib = 1024**3
    one = [r[0] for r in results[1]]
    two = results[2]
    rows = [
        (
            "teacher parameters per rank (GiB)",
            one[0]["teacher_bytes_local"] / gib,
            max(r["teacher_bytes_local"] for r in two[0]) / gib,
        ),
        (
            "peak memory growth while loading (GiB)",
            median([r["load_peak_anon_growth_mb"] for r in one]) / 1024,
            median([max(r["load_peak_anon_growth_mb"] for r in round_) for round_ in two]) / 1024,
        ),
        (
            "teacher load time (s)",
            median([r["load_seconds"] for r in one]),
            median([max(r["load_seconds"] for r in round_) for round_ in two]),
        ),
        (
            "distillation tokens/s (global)",
            median([r["tokens_per_second"] for r in one]),
            median([round_[0]["tokens_per_second"] for round_ in two]),
        ),
    ]
    ratios = [b[0]["tokens_per_second"] / a["tokens_per_second"] for a, b in zip(one, two)]
    print(
        f"\nBERT-large-shaped teacher ({one[0]['teacher_bytes_total'] / gib:.2f} GiB fp32), seq {args.seq}, "
        f"global batch {args.global_batch}, {os.cpu_count()} cores, median of {args.rounds} rounds"
    )
    print(f"{'':40s} {'N=1':>10s} {'N=2':>10s} {'N=2 / N=1':>10s}")
    for name, a, b in rows:
        print(f"{name:40s} {a:10.3f} {b:10.3f} {b / a:10.2f}")
    print(f"tokens/s ratio N=2 / N=1 per round: {', '.join(f'{r:.2f}' for r in ratios)}")
    if replicated:
        mib = 1024**2
        f, r = fsdp_again[0], replicated[0]
        print(f"\nstudent at N=2 ({f['student_parameters'] / 1e6:.1f}M parameters)  {'replicated':>12s} {'FSDP2':>10s}")
        print(
            f"{'student parameters per rank (MiB)':40s} {r['student_bytes_local'] / mib:12.1f} {f['student_bytes_local'] / mib:10.1f}"
        )
        print(
            f"{'distillation tokens/s (global)':40s} {r['tokens_per_second']:12.1f} {f['tokens_per_second']:10.1f}"
            f"   FSDP2 / replicated {f['tokens_per_second'] / r['tokens_per_second']:.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "args": vars(args),
                "cores": os.cpu_count(),
                "world_1": results[1],
                "world_2": results[2],
                "tokens_per_second_ratio_per_round": ratios,
                "student_replicated_world_2": replicated,
                "student_fsdp_world_2_beside_it": fsdp_again if replicated else None,
            },
            indent=2,
        )
    )
    print("raw figures:", args.out)


if __name__ == "__main__":
    main()
