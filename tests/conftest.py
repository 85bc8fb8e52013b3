"""Shared fixtures: tiny tokenizer, tiny HF teachers and a small corpus, built on the fly.

Nothing here downloads: the hubs are switched off for the whole test session and the
``datasets`` cache points into a temporary folder.
"""

import json
import os
import tempfile

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
from tests.helpers import make_hf_teacher  # noqa: E402

torch.set_num_threads(2)


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


@pytest.fixture(scope="session")
def smoke_assets(tmp_path_factory):
    """The smoke runs' teacher and corpus (configs/tiny.yaml and friends), built once for every
    test that runs a shipped smoke config: pass ``teacher.assets_dir`` and
    ``data.source.assets_dir`` to point the config at them."""
    from components.smoke import ensure_smoke_assets

    return ensure_smoke_assets(str(tmp_path_factory.mktemp("smoke_assets")))
