"""Shared fixtures (tiny tokenizer, tiny HF teachers, a small corpus, one distilled run, the smoke
assets) and the two tiers of the suite.

Tiers: ``python -m pytest`` runs the fast tier. Tests marked ``slow`` (``tune run`` launches that
prove the command line, multi-process runs, ONNX exports, torch.compile, the shipped smoke
configs end to end, runs killed from outside) are deselected unless ``--all`` is given:

    python -m pytest                  # the fast tier
    python -m pytest --all            # every test (CI: .ci/run)
    python -m pytest --all -m slow    # the slow tier only

Nothing here downloads: the hubs are switched off for the whole test session and the
``datasets`` cache points into a temporary folder. The smoke assets are cached across sessions
(see :func:`smoke_assets`).
"""

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

_CACHE = tempfile.mkdtemp(prefix="recursive-distill-tests-")
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_HOME=os.path.join(_CACHE, "hf"),
    HF_DATASETS_CACHE=os.path.join(_CACHE, "datasets"),
    TOKENIZERS_PARALLELISM="false",
)
# torch.compile's on-disk cache is not keyed on ATEN_CPU_CAPABILITY: a run under
# ATEN_CPU_CAPABILITY=avx2 after a default one would reuse kernels built for another ISA
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_CACHE, "inductor")

import pytest  # noqa: E402
import torch  # noqa: E402

from components.smoke import stdlib_docstrings, train_tokenizer  # noqa: E402
from tests.helpers import make_hf_teacher, REPO  # noqa: E402

torch.set_num_threads(2)


# ---------------------------------------------------------------- tiers
def pytest_addoption(parser):
    parser.addoption(
        "--all",
        action="store_true",
        dest="run_all",
        help="run every test: without it the tests marked slow are deselected (the fast tier)",
    )


_DESELECTED = pytest.StashKey[int]()


def pytest_collection_modifyitems(config, items):
    if config.getoption("run_all"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
    config.stash[_DESELECTED] = len(slow)


def pytest_report_header(config):
    if config.getoption("run_all"):
        return "tiers: all (--all)"
    return "tiers: fast only; the tests marked slow are deselected (--all runs them too)"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    count = config.stash.get(_DESELECTED, 0)
    if count:
        terminalreporter.write_line(
            f"{count} slow tests were deselected: `python -m pytest --all` runs every test, "
            "`python -m pytest --all -m slow` the slow tier only"
        )


# ---------------------------------------------------------------- small shared data
@pytest.fixture(scope="session")
def documents():
    """About 60k characters of English prose (standard-library docstrings)."""
    return list(stdlib_docstrings(max_chars=60_000))


@pytest.fixture(scope="session")
def tokenizer(documents):
    return train_tokenizer(documents, vocab_size=300)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer):
    return make_hf_teacher(tmp_path_factory.mktemp("teacher"), tokenizer)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, documents):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")
    return path


# ---------------------------------------------------------------- one distilled run for many tests
def _digests(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="session")
def distilled_run(tmp_path_factory, teacher_dir, corpus_file):
    """A finished tiny distillation: ``tiny_config(out, teacher_dir, corpus_file, **DISTILLED)``
    (tests.recipe_helpers: 4 steps, the student's defaults: adapters, dropout 0.1; one checkpoint,
    at the end; metrics.jsonl, tensorboard/, student/). Shared by every test of the session that
    needs a distilled student or a finished run: read it, or copy it before changing anything
    (the session fails at teardown if a test changed it)."""
    from tests.recipe_helpers import DISTILLED, run_recipe, tiny_config

    out = tmp_path_factory.mktemp("distilled") / "run"
    run_recipe(tiny_config(out, teacher_dir, corpus_file, **DISTILLED))
    written = _digests(out)
    yield out
    assert _digests(out) == written, f"a test changed the shared run {out}: copy it before changing it"


@pytest.fixture(scope="session")
def distilled_student(distilled_run):
    """The student folder of :func:`distilled_run` (read only)."""
    return distilled_run / "student"


# ---------------------------------------------------------------- smoke assets, cached by content
def _test_cache() -> Path:
    """``$RECURSIVE_DISTILL_TEST_CACHE``, else ``recursive-distill-tests/`` in the user's cache folder."""
    if os.environ.get("RECURSIVE_DISTILL_TEST_CACHE"):
        return Path(os.environ["RECURSIVE_DISTILL_TEST_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "recursive-distill-tests"


def _smoke_assets_key() -> str:
    """A digest of everything the smoke assets are a function of: the code that builds them (the
    assets module and the windowing and masking it calls), the standard library whose docstrings
    are the corpus (this Python build), the libraries that train the tokenizer and the teacher,
    and the CPU kernels' family (float results of the pre-training depend on them)."""
    import platform
    import sysconfig

    import tokenizers
    import transformers

    import components.data.corpus
    import components.data.mlm
    import components.smoke.assets

    digest = hashlib.sha256()
    for module in (components.smoke.assets, components.data.corpus, components.data.mlm):
        digest.update(Path(module.__file__).read_bytes())
    for part in (
        sys.version,
        sysconfig.get_paths()["stdlib"],
        torch.__version__,
        transformers.__version__,
        tokenizers.__version__,
        platform.machine(),
        os.environ.get("ATEN_CPU_CAPABILITY", ""),
    ):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:20]


def _cached_smoke_assets(scratch: Path) -> Path:
    """The smoke assets in the test cache, built there first if missing: in a temporary folder
    renamed into place once whole, so that an interrupted build or a concurrent session never
    leaves half a folder under the key. Entries unused for 30 days (unfinished builds: a day) are
    removed. Where the cache cannot be written, they are built in ``scratch`` instead."""
    from components.smoke import ensure_smoke_assets

    root = _test_cache() / "smoke_assets"
    key = _smoke_assets_key()
    folder = root / key
    if (folder / "corpus.jsonl").is_file() and (folder / "teacher" / "config.json").is_file():
        os.utime(folder)  # used now
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    except OSError:  # a read-only home, say: build for this session only
        return ensure_smoke_assets(str(scratch))
    try:
        ensure_smoke_assets(str(building))
        try:
            os.rename(building, folder)
        except OSError:
            if not folder.is_dir():  # not another session's build finished first: a real error
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    now = time.time()
    for old in root.iterdir():
        try:
            age = now - old.stat().st_mtime
            if old.name != key and age > (86400 if ".tmp-" in old.name else 30 * 86400):
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return folder


@pytest.fixture(scope="session")
def smoke_assets(tmp_path_factory):
    """The smoke runs' teacher and corpus (configs/tiny.yaml and friends), for every test that
    runs a shipped smoke config: pass ``teacher.assets_dir`` and ``data.source.assets_dir`` to
    point the config at them. Building them pre-trains the teacher (tens of seconds), so they are
    built once per content (:func:`_smoke_assets_key`) in ``$RECURSIVE_DISTILL_TEST_CACHE`` (else
    ``~/.cache/recursive-distill-tests/``) and copied into this session's temporary folder."""
    folder = tmp_path_factory.mktemp("smoke_assets")
    cached = _cached_smoke_assets(tmp_path_factory.mktemp("smoke_assets_build"))
    shutil.copytree(cached, folder, dirs_exist_ok=True)
    return folder


# ---------------------------------------------------------------- a recipe's command line, in process
class Launch(NamedTuple):
    """What a recipe's ``recipe_main`` did: exit code (0 for a normal end), stdout, stderr, and
    the log lines it wrote (INFO and up)."""

    code: int
    stdout: str
    stderr: str
    log: str


@pytest.fixture
def run_main(monkeypatch, capsys, caplog):
    """``run_main("finetune", "--config", path, "key=value", ...)``: what ``tune run
    recipes/finetune.py --config path key=value ...`` does, in this process: the recipe's
    ``recipe_main`` (config file, overrides, checks, the run, one-line errors and exit codes)
    with that ``sys.argv``, from the repository root. No new interpreter: one real ``tune run``
    per recipe (marked slow) proves the launcher itself."""
    import importlib

    def call(recipe: str, *args) -> Launch:
        module = importlib.import_module(f"recipes.{recipe}")
        monkeypatch.chdir(REPO)
        monkeypatch.setattr(sys, "argv", [f"recipes/{recipe}.py", *map(str, args)])
        capsys.readouterr()  # what the test printed before is not the recipe's
        first = len(caplog.records)
        with caplog.at_level(logging.INFO):
            with pytest.raises(SystemExit) as exited:
                module.recipe_main()
        out, err = capsys.readouterr()
        log = "\n".join(record.getMessage() for record in caplog.records[first:])
        code = exited.value.code
        return Launch(0 if code is None else code, out, err, log)

    return call
