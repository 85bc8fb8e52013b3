"""Assets for the embedded smoke run (``configs/tiny.yaml``), built on the fly, no download.

SMOKE RUN ONLY: the teacher is a tiny BERT (hidden 64, 4 layers) with a WordPiece vocabulary
trained here, briefly pre-trained with masked-LM on the corpus so that distilling it means
something. The corpus is the docstrings of this Python installation's standard library: English
prose that every machine running this project already has. Neither says anything about the
quality of a real distillation; they prove that every part of the pipeline runs.

Assets land in ``<assets_dir>/corpus.jsonl`` and ``<assets_dir>/teacher/`` (a Hugging Face
folder loaded through the same path as any real teacher) and are reused when present.
"""

import ast
import json
import logging
import sysconfig
from pathlib import Path
from typing import Iterator, List

import torch
from tokenizers import BertWordPieceTokenizer
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from components.checkpointing.teacher import hf_teacher
from components.data.corpus import special_tokens_template, window_starts
from components.data.mlm import MLMMasker, pad_batch, step_generator
from components.io import atomic_directory, atomic_file, check_write_path

log = logging.getLogger(__name__)

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}


def stdlib_docstrings(max_chars: int = 1_500_000, reverse: bool = False) -> Iterator[str]:
    """One document per standard-library module: its module, class and function docstrings.

    Read with ``ast`` (nothing is imported or executed), in sorted path order (``reverse``: from
    the last module back), so the corpus is the same on every run of the same Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py"), reverse=reverse):
        if SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        docs = [ast.get_docstring(tree)] + [
            ast.get_docstring(node)
            for node in ast.walk(tree)
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        text = "\n".join(d for d in docs if d and len(d) > 40)
        if len(text) < 200:
            continue
        yield text
        total += len(text)
        if total >= max_chars:
            return


def _write_corpus(path: Path, documents: List[str]) -> None:
    with atomic_file(path, "smoke corpus") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(documents: List[str], vocab_size: int):
    trained = BertWordPieceTokenizer(lowercase=True)
    trained.train_from_iterator(
        documents, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    # The trainer numbers tokens of equal frequency in no fixed order; renumber them so the
    # same corpus always gives the same ids (and the same smoke teacher).
    pieces = sorted(set(trained.get_vocab()) - set(SPECIAL_TOKENS))
    wordpiece = BertWordPieceTokenizer(
        vocab={token: i for i, token in enumerate(SPECIAL_TOKENS + pieces)}, lowercase=True
    )
    return BertTokenizerFast(
        tokenizer_object=wordpiece._tokenizer,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=128,
    )


def _pretrain_teacher(model, tokenizer, documents: List[str], steps: int, seed: int) -> None:
    """A few hundred MLM steps, so the smoke teacher knows something to distil."""
    prefix, suffix = special_tokens_template(tokenizer)
    body = 62
    windows = []
    for ids in tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]:
        windows += [prefix + ids[s : s + body] + suffix for s in window_starts(len(ids), body, body)]
    masker = MLMMasker(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    model.train()
    batch_size = 32
    for step in range(steps):
        g = step_generator(seed, step, 3)
        rows = torch.randint(len(windows), (batch_size,), generator=g).tolist()
        batch = pad_batch([windows[i] for i in rows], tokenizer.pad_token_id)
        noise = masker.noise(batch_size, batch["input_ids"].shape[1], g)
        inputs, labels = masker(batch["input_ids"], batch["attention_mask"], noise)
        loss = model(input_ids=inputs, attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log.info("smoke teacher pre-training: step %d/%d, MLM loss %.3f", step + 1, steps, loss.item())
    model.eval()


def ensure_smoke_assets(assets_dir: str, vocab_size: int = 2000, pretrain_steps: int = 300, seed: int = 0) -> Path:
    """Build the corpus and the tiny teacher under ``assets_dir`` unless they exist."""
    root = Path(assets_dir)
    corpus, teacher = root / "corpus.jsonl", root / "teacher"
    if corpus.is_file() and (teacher / "config.json").is_file():
        return root  # reading needs no write permission (they may live outside output_dir)
    root = check_write_path(assets_dir, "smoke assets")
    corpus, teacher = root / "corpus.jsonl", root / "teacher"
    log.info("Building smoke-run assets in %s (tiny teacher, stdlib-docstring corpus)", root)
    documents = list(stdlib_docstrings())
    root.mkdir(parents=True, exist_ok=True)
    _write_corpus(corpus, documents)
    tokenizer = train_tokenizer(documents, vocab_size)
    # Building assets must not move the caller's random state: a later run that finds them
    # built has to initialise its student exactly like this one.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertForMaskedLM(
            BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=256,
                max_position_embeddings=128,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        _pretrain_teacher(model, tokenizer, documents, pretrain_steps, seed)
    with atomic_directory(teacher, "smoke teacher") as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return root


def smoke_teacher(assets_dir: str, dtype: str = "fp32", shard=None):
    """SMOKE RUN: the tiny pre-trained teacher, loaded like any Hugging Face checkpoint."""
    return hf_teacher(str(ensure_smoke_assets(assets_dir) / "teacher"), dtype=dtype, shard=shard)


def smoke_corpus(assets_dir: str) -> str:
    """SMOKE RUN: path of the stdlib-docstring corpus (JSON lines, one module per line)."""
    return str(ensure_smoke_assets(assets_dir) / "corpus.jsonl")
