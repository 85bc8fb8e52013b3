#!/usr/bin/env python
"""The corpus store at scale: bytes on disk per corpus token, build time and peak memory.

    python benchmarks/corpus.py --quick     # a 20 MB corpus, about a minute on 2 cores
    python benchmarks/corpus.py             # a 1 GB corpus (the figure docs/performance.md extrapolates)
    python benchmarks/corpus.py --mb 200    # any size

A plain-text corpus of the given size is generated (standard-library docstrings, repeated,
paragraphs separated by blank lines), with a WordPiece tokenizer of BERT's vocabulary size
trained on its first megabytes. In a fresh process, ``components.data.build_windows`` reads it
(``datasets`` keeps one Arrow copy of the text: "the text itself") and builds the window store;
peak RSS is that process's. Reported at the shipped window settings (max_length 256, stride
128) and at the issue's 128/64:

- store bytes per corpus token: everything the store puts on disk, over the corpus's tokens;
- the previous layout for reference (``--quick`` only): windows materialised as token lists by
  ``datasets.map`` in the same run, bytes per corpus token;
- build time and peak memory of the building process: RSS (which counts the pages of the
  memory-mapped Arrow text it has read) and anonymous memory (what the build holds).

Without --quick only the shipped setting is measured.

Results: a table on stdout and JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SCRATCH = Path(os.environ.get("BENCH_SCRATCH", "/tmp/bench_scratch")) / "corpus"
SETTINGS = ((256, 128), (128, 64))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def make_corpus(path: Path, megabytes: int) -> None:
    """``megabytes`` of text: docstring paragraphs, numbered so that no two documents repeat."""
    from components.smoke import stdlib_docstrings

    documents = list(stdlib_docstrings(max_chars=3_000_000))
    target, written, i = megabytes * 1_000_000, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            text = f"Part {i}. " + documents[i % len(documents)] + "\n\n"
            f.write(text)
            written += len(text.encode())
            i += 1


def make_tokenizer(corpus: Path, folder: Path) -> None:
    from components.smoke import train_tokenizer

    with open(corpus, encoding="utf-8") as f:
        sample = f.read(5_000_000).split("\n\n")
    train_tokenizer(sample, vocab_size=30522).save_pretrained(folder)


def memory_kib() -> dict:
    """VmRSS and RssAnon of this process (Linux), in KiB."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                found[key] = int(value.split()[0])
    return found


def build(corpus: Path, tokenizer_dir: Path, max_length: int, stride: int, cache: Path) -> dict:
    """In this process (run it in a fresh one): build_windows, timed, with peak RSS."""
    os.environ["RECURSIVE_DISTILL_CACHE"] = str(cache / "store")
    os.environ["HF_DATASETS_CACHE"] = str(cache / "datasets")
    from transformers import AutoTokenizer

    from components.data import build_windows

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = {
        "text_column": "text", "hub_config": None, "split": "train", "sample_by": "paragraph",
        "encoding_errors": "strict", "num_proc": None, "eval_fraction": 0.0, "max_eval_windows": 0,
        "max_length": max_length, "stride": stride,
    }  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    anon_before = memory_kib()["RssAnon"]
    peak = {"RssAnon": anon_before}
    done = threading.Event()

    def sample():  # peak anonymous memory: RSS also counts the text's memory-mapped Arrow pages
        while not done.wait(0.05):
            peak["RssAnon"] = max(peak["RssAnon"], memory_kib()["RssAnon"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    train, _, _ = build_windows(data, str(corpus), tokenizer, seed=0)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {
        "seconds": seconds,
        "tokens": train.meta["num_tokens"],
        "windows": len(train),
        "store_bytes": folder_bytes(train.folder),
        "text_bytes": folder_bytes(cache / "datasets"),
        "rss_before_mib": before / 1024,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "anon_before_mib": anon_before / 1024,
        "peak_anon_mib": peak["RssAnon"] / 1024,
    }


def previous_layout(corpus: Path, tokenizer_dir: Path, max_length: int, stride: int, cache: Path) -> dict:
    """The layout before the store: every window a token list in a datasets Arrow file."""
    os.environ["HF_DATASETS_CACHE"] = str(cache / "datasets")
    import datasets
    from transformers import AutoTokenizer

    from components.data.corpus import load_documents, special_tokens_template, window_starts

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    documents = load_documents(str(corpus))
    text_bytes = folder_bytes(cache / "datasets")
    prefix, suffix = special_tokens_template(tokenizer)
    body = max_length - len(prefix) - len(suffix)

    def to_windows(batch):
        encoded = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {
            "input_ids": [
                prefix + ids[s : s + body] + suffix for ids in encoded for s in window_starts(len(ids), body, stride)
            ]
        }

    started = time.perf_counter()
    windows = documents.map(to_windows, batched=True, remove_columns=["text"])
    seconds = time.perf_counter() - started
    assert isinstance(windows, datasets.Dataset)
    return {"seconds": seconds, "window_bytes": folder_bytes(cache / "datasets") - text_bytes}


def child(kind: str, *args) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 20 MB corpus, with the previous layout beside it")
    parser.add_argument("--mb", type=int, default=None, help="corpus size in MB (default 1000; --quick 20)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, corpus, tok, length, stride, cache = args.child
        fn = build if kind == "build" else previous_layout
        print(json.dumps(fn(Path(corpus), Path(tok), int(length), int(stride), Path(cache))))
        return

    megabytes = args.mb or (20 if args.quick else 1000)
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    corpus = SCRATCH / "corpus.txt"
    log(f"generating a {megabytes} MB corpus")
    make_corpus(corpus, megabytes)
    log("training a 30522-entry WordPiece tokenizer on its first 5 MB")
    make_tokenizer(corpus, SCRATCH / "tokenizer")

    rows = []
    for max_length, stride in SETTINGS if args.quick else SETTINGS[:1]:
        cache = SCRATCH / f"cache_{max_length}_{stride}"
        log(f"building the store at max_length {max_length}, stride {stride}")
        r = child("build", corpus, SCRATCH / "tokenizer", max_length, stride, cache)
        r.update(max_length=max_length, stride=stride, corpus_bytes=corpus.stat().st_size)
        if args.quick:
            log("the previous layout on the same corpus")
            old = child(
                "previous", corpus, SCRATCH / "tokenizer", max_length, stride, SCRATCH / f"old_{max_length}_{stride}"
            )
            r["previous_bytes_per_token"] = old["window_bytes"] / r["tokens"]
            r["previous_seconds"] = old["seconds"]
        rows.append(r)
        shutil.rmtree(cache, ignore_errors=True)

    print(f"\nCorpus: {megabytes} MB of text, {rows[0]['tokens'] / 1e6:.1f}M tokens (30522-entry WordPiece)\n")
    head = (
        f"{'window':>9} {'store B/token':>14} {'text B/token':>13} {'build s':>8} {'M tokens/s':>11} "
        f"{'peak RSS MiB':>13} {'anon MiB: start':>16} {'peak':>6}"
    )
    if args.quick:
        head += f" {'before: B/token':>16}"
    print(head)
    for r in rows:
        line = (
            f"{r['max_length']:>4}/{r['stride']:<4} {r['store_bytes'] / r['tokens']:>14.2f} {r['text_bytes'] / r['tokens']:>13.2f} "
            f"{r['seconds']:>8.1f} {r['tokens'] / r['seconds'] / 1e6:>11.2f} {r['peak_rss_mib']:>13.0f} "
            f"{r['anon_before_mib']:>16.0f} {r['peak_anon_mib']:>6.0f}"
        )
        if args.quick:
            line += f" {r['previous_bytes_per_token']:>16.2f}"
        print(line)
    worst = max(r["store_bytes"] / r["tokens"] for r in rows)
    print(f"\nAt most {worst:.2f} bytes per corpus token beyond the text (target: 4).")
    print("Peak RSS counts the pages of the memory-mapped Arrow text read so far (reclaimable);")
    print("anon is the memory the build itself holds, sampled every 50 ms.")
    (HERE / "results").mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = HERE / "results" / f"corpus-{stamp}.json"
    out.write_text(json.dumps({"megabytes": megabytes, "rows": rows}, indent=1) + "\n")
    log(f"wrote {out}")
    shutil.rmtree(SCRATCH, ignore_errors=True)


if __name__ == "__main__":
    main()
