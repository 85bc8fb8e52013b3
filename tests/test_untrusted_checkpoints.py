"""Model folders from strangers (issue 11): a config.json whose sizes its weights do not back is
refused before anything is allocated, a shard index may not point out of its folder, and a Hub
id already in the local Hugging Face cache loads offline. Every loader (teachers, students,
fine-tuned models, transformers' Auto classes) makes the same check. Every refusal names the
file and the key, and leaves the folder as it was."""

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from components.checkpointing import CheckpointError, hf_teacher, load_student, save_student
from components.models import bottleneck_tiny, recursive_tiny
from tests.helpers import make_hf_teacher

INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def listing(root: Path) -> dict:
    """Every entry under ``root`` (links not followed) with its size, modification time and, for
    a regular file, a SHA-256 of its bytes."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, digest)
    return out


def copy_with(src: Path, dst: Path, **changes) -> Path:
    """A copy of the model folder ``src`` with config.json keys changed ("family.key" nests)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        *outer, last = key.split(".")
        node = config
        for part in outer:
            node = node[part]
        node[last] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def refuses(load, folder: Path, message: str) -> None:
    before = listing(folder)
    with pytest.raises(CheckpointError, match=message):
        load(str(folder))
    assert listing(folder) == before


def shard(folder: Path) -> dict:
    """Split ``folder``'s model.safetensors into two shards and an index; returns the index."""
    state = load_file(str(folder / "model.safetensors"))
    names = sorted(state)
    halves = {SHARDS[0]: names[: len(names) // 2], SHARDS[1]: names[len(names) // 2 :]}
    for file, part in halves.items():
        save_file({n: state[n] for n in part}, str(folder / file), {"format": "pt"})
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {n: file for file, part in halves.items() for n in part}}
    (folder / INDEX).write_text(json.dumps(index))
    return index


def logits(teacher):
    ids = torch.arange(5, 17).reshape(2, 6)
    return teacher(ids, torch.ones_like(ids)).logits


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory, tokenizer):
    return make_hf_teacher(tmp_path_factory.mktemp("small") / "teacher", tokenizer, layers=2)


# ---------------------------------------------------------------- 1. sizes against the weights
@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "num_hidden_layers",
            10**8,
            r"config\.json says num_hidden_layers=100000000 but .*model\.safetensors holds 2 layers",
        ),
        (
            "vocab_size",
            10**12,
            r"config\.json says vocab_size=1000000000000 but .*model\.safetensors holds \S*word_embeddings\.weight with 300 rows",
        ),
        (
            "hidden_size",
            10**6,
            r"config\.json says hidden_size=1000000 but .*model\.safetensors holds \S*word_embeddings\.weight with 32 columns",
        ),
        (
            "max_position_embeddings",
            10**9,
            r"config\.json says max_position_embeddings=1000000000 but .*model\.safetensors holds",
        ),
        (
            "intermediate_size",
            10**7,
            r"config implies \(10000000,.*model\.safetensors; .*config\.json says intermediate_size=10000000\)",
        ),
    ],
)
def test_teacher_config_sizes_are_checked_against_the_weights(tmp_path, small_teacher, key, value, message):
    refuses(hf_teacher, copy_with(small_teacher, tmp_path / "t", **{key: value}), message)


def test_pytorch_bin_teacher_sizes_are_checked_too(tmp_path, small_teacher):
    folder = copy_with(small_teacher, tmp_path / "t", num_hidden_layers=3)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    refuses(
        hf_teacher,
        folder,
        r"config\.json says num_hidden_layers=3 but .*pytorch_model\.bin holds 2 layers: missing \['layers\.2\.",
    )


@pytest.mark.parametrize(
    "make, key, value, message",
    [
        # ALBERT format: the word embeddings' rows
        (
            lambda v: recursive_tiny(vocab_size=v, adapter_placement=None),
            "vocab_size",
            10**12,
            r"config\.json says vocab_size=1000000000000 but .*model\.safetensors holds albert\.embeddings\.word_embeddings\.weight with 300 rows",
        ),
        # a recursive student reuses one layer, so no weight counts iterations: the bound does
        (
            lambda v: recursive_tiny(vocab_size=v, adapter_placement=None, mlm_head_size=48),
            "recursive_encoder.num_iterations",
            10**8,
            r"config\.json says recursive_encoder\.num_iterations=100000000: more than 10000 layers is refused",
        ),
        # MobileBERT format: stacked layers
        (
            lambda v: bottleneck_tiny(vocab_size=v),
            "num_hidden_layers",
            5,
            r"config\.json says num_hidden_layers=5 but .*model\.safetensors holds 4 layers: missing \['mobilebert\.encoder\.layer\.4\.",
        ),
        # native bottleneck: terabytes of hidden layer
        (
            lambda v: bottleneck_tiny(vocab_size=v, use_bottleneck_attention=False, key_query_shared_bottleneck=False),
            "bottleneck_encoder.hidden_size",
            10**6,
            r"config\.json implies about .* parameters \(its largest sizes: bottleneck_encoder\.hidden_size=1000000.*more than 1e\+11 is refused",
        ),
        # a size no single tensor shows: compared shape by shape on the meta device
        (
            lambda v: bottleneck_tiny(vocab_size=v),
            "intermediate_size",
            10**5,
            r"config implies \(100000,\) \(in .*model\.safetensors; .*config\.json says intermediate_size=100000\)",
        ),
    ],
)
def test_student_config_sizes_are_checked_against_the_weights(tmp_path, tokenizer, make, key, value, message):
    torch.manual_seed(0)
    save_student(make(len(tokenizer)), tmp_path / "saved")
    refuses(load_student, copy_with(tmp_path / "saved", tmp_path / "s", **{key: value}), message)


# ---------------------------------------------------------------- 2. shard indexes
def test_a_sharded_teacher_loads_only_from_inside_its_folder(tmp_path, small_teacher):
    sharded = tmp_path / "sharded"
    shutil.copytree(small_teacher, sharded)
    index = shard(sharded)
    assert torch.equal(logits(hf_teacher(str(sharded))), logits(hf_teacher(str(small_teacher))))

    outside = tmp_path / "outside"  # a valid shard that must not be read through the index
    outside.mkdir()
    shutil.copy(sharded / SHARDS[1], outside / SHARDS[1])

    def pointing_to(name: str, entry: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(sharded, folder, symlinks=True)
        weight_map = {k: (entry if v == SHARDS[1] else v) for k, v in index["weight_map"].items()}
        (folder / INDEX).write_text(json.dumps({"weight_map": weight_map}))
        return folder

    absolute = pointing_to("absolute", str(outside / SHARDS[1]))
    refuses(hf_teacher, absolute, rf"absolute/{INDEX} names a shard outside .*absolute: '{outside / SHARDS[1]}'")
    dotdot = pointing_to("dotdot", f"../outside/{SHARDS[1]}")
    refuses(hf_teacher, dotdot, rf"dotdot/{INDEX} names a shard outside .*dotdot: '\.\./outside/{SHARDS[1]}'")
    linked = pointing_to("linked", "linked.safetensors")
    (linked / "linked.safetensors").symlink_to(outside / SHARDS[1])
    refuses(
        hf_teacher,
        linked,
        rf"linked/{INDEX} names a shard outside .*linked: 'linked\.safetensors' resolves to .*outside",
    )

    bin_index = tmp_path / "bin_index"
    shutil.copytree(small_teacher, bin_index)
    (bin_index / "model.safetensors").unlink()
    (bin_index / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "/etc/passwd"}}))
    refuses(hf_teacher, bin_index, r"pytorch_model\.bin\.index\.json names a shard outside .*: '/etc/passwd'")


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", r"index\.json is not a readable JSON shard index"),
        ('{"metadata": {}}', r'index\.json is not a shard index: it has no "weight_map"'),
        ('["weight_map"]', r'index\.json is not a shard index: it has no "weight_map"'),
        (
            '{"weight_map": ["a.safetensors"]}',
            r'index\.json: "weight_map" must map weight names to shard files, got list',
        ),
        (
            '{"weight_map": {"bert.embeddings.word_embeddings.weight": 3}}',
            r"index\.json: \"weight_map\" entry 'bert\.embeddings\.word_embeddings\.weight' names no shard file: 3",
        ),
    ],
)
def test_a_malformed_shard_index_is_named(tmp_path, small_teacher, text, message):
    folder = tmp_path / "t"
    shutil.copytree(small_teacher, folder)
    shard(folder)
    (folder / INDEX).write_text(text)
    refuses(hf_teacher, folder, message)


def test_a_weight_missing_from_the_shards_is_named(tmp_path, small_teacher):
    folder = tmp_path / "t"
    shutil.copytree(small_teacher, folder)
    index = shard(folder)
    gone = "bert.encoder.layer.1.output.dense.weight"
    file = folder / index["weight_map"][gone]
    state = load_file(str(file))
    del state[gone]
    save_file(state, str(file), {"format": "pt"})
    refuses(hf_teacher, folder, rf"missing \['layers\.1\.ffn_out\.weight'\].*\(weights: .*t/{INDEX}\)")


# ---------------------------------------------------------------- 3. a Hub id, offline
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(hub: Path, repo_id: str, files: Path) -> Path:
    """The layout huggingface_hub writes: refs/main names a commit, whose snapshot folder links
    each file to its blob."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in files.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


def test_a_cached_hub_teacher_loads_offline(tmp_path, small_teacher, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    sharded = tmp_path / "sharded"  # shards too: their links lead into blobs/, which is allowed
    shutil.copytree(small_teacher, sharded)
    shard(sharded)
    hub = tmp_path / "hub"
    fake_hub_cache(hub, "org/tiny-bert", sharded)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = listing(hub)
    expected = logits(hf_teacher(str(small_teacher)))

    assert torch.equal(logits(hf_teacher("org/tiny-bert")), expected)
    assert torch.equal(logits(hf_teacher("org/tiny-bert", revision=COMMIT)), expected)
    with pytest.raises(
        CheckpointError,
        match=(
            r"'org/not-cached' is not a local folder.*HF_HUB_OFFLINE is set.*not in the local Hugging Face cache "
            r".*hub.*Download it once while online.*or pass the path of a folder"
        ),
    ):
        hf_teacher("org/not-cached")

    # online, but the Hub cannot be reached: the cache answers too
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
    assert torch.equal(logits(hf_teacher("org/tiny-bert")), expected)
    with pytest.raises(
        CheckpointError, match=r"'org/not-cached' .*ConnectionError: no route to huggingface\.co.*Download it once"
    ):
        hf_teacher("org/not-cached")
    assert listing(hub) == before


# ---------------------------------------------------------------- 4. every loader makes the one check
# Before the check, each of these hung (10^7 per-iteration adapters take minutes to lay out, even on
# the meta device) or tried to allocate hundreds of GB (load_task_model built for real), or failed
# with a report naming neither the file nor the key (transformers' shape mismatch). They run in a
# fresh interpreter capped at 8 GiB of address space, so that a loader without the check fails
# this test (a timeout, a MemoryError) instead of taking the machine down.
CHILD = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
import components, components.checkpointing.auto_models
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification
from components.checkpointing.auto_configs import StudentConfig
from components.checkpointing.finetuned import load_task_model
for call in json.loads(sys.argv[1]):
    start = time.monotonic()
    try:
        eval(call)
        result = ["loaded", ""]
    except Exception as e:
        result = [type(e).__name__, str(e)]
    print(json.dumps(result + [time.monotonic() - start]), flush=True)
"""


def loads_in_a_child(cases, timeout: int = 240) -> None:
    """Run each ``(call, expected)`` in one fresh interpreter: ``expected`` None means it loads,
    else a pattern of the one-line CheckpointError it must raise within seconds."""
    calls = [call for call, _ in cases]
    try:
        result = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(calls)], capture_output=True, text=True, timeout=timeout
        )
        lines = result.stdout.splitlines()
    except subprocess.TimeoutExpired as e:
        result, lines = None, (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or "").splitlines()
    if result is None:
        pytest.fail(f"still loading after {timeout}s: {calls[len(lines)]} (the ones before gave {lines})")
    assert len(lines) == len(cases), result.stderr[-3000:]
    for (call, expected), line in zip(cases, lines):
        kind, message, seconds = json.loads(line)
        if expected is None:
            assert kind == "loaded", (call, kind, message)
            continue
        assert kind == "CheckpointError" and re.search(expected, message), (call, kind, message)
        assert "\n" not in message and seconds < 15, (call, message, seconds)


@pytest.fixture(scope="module")
def native_student(tmp_path_factory, tokenizer):
    """A student with per-iteration adapters: native format, loaded through our Auto classes."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("native") / "student"
    assert (
        save_student(recursive_tiny(vocab_size=len(tokenizer), adapter_placement="minialbert"), folder, tokenizer)
        == "native"
    )
    return folder


@pytest.fixture(scope="module")
def finetuned_model(tmp_path_factory, tokenizer):
    from components.checkpointing.finetuned import save_task_model
    from components.models.heads import TaskModel

    torch.manual_seed(0)
    encoder = recursive_tiny(vocab_size=len(tokenizer), adapter_placement="minialbert", mlm_head=False)
    folder = tmp_path_factory.mktemp("finetuned") / "model"
    save_task_model(
        TaskModel(encoder, "classification", 2, 0.1), folder, {"type": "classification", "label_names": ["no", "yes"]}
    )
    return folder


def test_the_auto_classes_check_sizes_before_building(tmp_path, native_student):
    """From a folder, from a Hub id's cached snapshot, and from a config built in code."""
    iterations = copy_with(native_student, tmp_path / "iterations", **{"recursive_encoder.num_iterations": 10**7})
    vocab = copy_with(native_student, tmp_path / "vocab", **{"recursive_encoder.vocab_size": 10**9})
    ffn = copy_with(native_student, tmp_path / "ffn", **{"recursive_encoder.intermediate_size": 10**5})
    hub = tmp_path / "hub"  # a Hub id, resolved offline to its cached snapshot
    snapshot = fake_hub_cache(hub, "org/absurd", vocab)
    args = json.loads((native_student / "config.json").read_text())["recursive_encoder"]
    absurd, huge = {**args, "num_iterations": 10**7}, {**args, "hidden_size": 10**6}
    before = listing(tmp_path)
    loads_in_a_child(
        [
            (f"AutoModel.from_pretrained({str(native_student)!r})", None),
            (f"AutoModelForMaskedLM.from_pretrained({str(native_student)!r})", None),
            (
                f"AutoModel.from_pretrained({str(iterations)!r})",
                rf"^{re.escape(str(iterations))}/config\.json says recursive_encoder\.num_iterations=10000000: more than 10000 layers is refused$",
            ),
            (
                f"AutoModelForSequenceClassification.from_pretrained({str(iterations)!r}, num_labels=3)",
                r"iterations/config\.json says recursive_encoder\.num_iterations=10000000: more than 10000 layers",
            ),
            (
                f"AutoModelForMaskedLM.from_pretrained({str(vocab)!r})",
                rf"^{re.escape(str(vocab))}/config\.json says recursive_encoder\.vocab_size=1000000000 but "
                rf"{re.escape(str(vocab))}/model\.safetensors holds embeddings\.word_embeddings\.weight with 300 rows$",
            ),
            (
                f"AutoModel.from_pretrained({str(ffn)!r})",
                r"ffn: layer\.ffn_in\.bias has shape \(128,\), config implies \(100000,\) \(in .*ffn/model\.safetensors; "
                r".*ffn/config\.json says recursive_encoder\.intermediate_size=100000\)",
            ),
            (
                f"AutoModel.from_pretrained('org/absurd', cache_dir={str(hub)!r})",
                rf"^{re.escape(str(snapshot))}/config\.json says recursive_encoder\.vocab_size=1000000000 but .*holds embeddings\.word_embeddings",
            ),
            (
                f"AutoModel.from_config(StudentConfig(recursive_encoder={absurd!r}))",
                r"^the StudentConfig passed says recursive_encoder\.num_iterations=10000000: more than 10000 layers is refused$",
            ),
            (
                f"AutoModel.from_config(StudentConfig(recursive_encoder={huge!r}))",
                r"^the StudentConfig passed implies about .* parameters \(its largest sizes: recursive_encoder\.hidden_size=1000000.*more than 1e\+11 is refused",
            ),
        ]
    )
    assert listing(tmp_path) == before


def test_fine_tuned_models_check_sizes_before_building(tmp_path, finetuned_model):
    """load_task_model and the Auto class, on the same folders, refuse with the same line."""
    cases = [(None, {})]
    for key, value, message in [
        (
            "encoder.config.num_iterations",
            10**7,
            r"config\.json says encoder\.config\.num_iterations=10000000: more than 10000 layers is refused$",
        ),
        (
            "encoder.config.vocab_size",
            10**9,
            r"config\.json says encoder\.config\.vocab_size=1000000000 but \S*model\.safetensors holds "
            r"encoder\.embeddings\.word_embeddings\.weight with 300 rows$",
        ),
        (
            "encoder.config.hidden_size",
            10**6,
            r"config\.json implies about .* parameters \(its largest sizes: encoder\.config\.hidden_size=1000000",
        ),
        (
            "encoder.config.intermediate_size",
            10**5,
            r"encoder\.layer\.ffn_in\.bias has shape \(128,\), config implies \(100000,\) .*config\.json says encoder\.config\.intermediate_size=100000",
        ),
        (
            "head.num_labels",
            10**6,
            r"config\.json says head\.num_labels=1000000 but (\S*model\.safetensors holds head\.classifier\.weight "
            r"with shape \(2, 64\)|task\.label_names holds 2 names)$",
        ),
        (
            "head.num_labels",
            10**9,
            r"(config\.json|FinetunedConfig): head\.num_labels must be a whole number from 1 to 1000000, got 1000000000$",
        ),
    ]:
        cases.append((message, copy_with(finetuned_model, tmp_path / f"{key}={value}", **{key: value})))
    before = listing(tmp_path)
    calls = []
    for message, folder in cases:
        target = str(folder) if message else str(finetuned_model)
        calls.append((f"load_task_model({target!r})", message))
        calls.append((f"AutoModelForSequenceClassification.from_pretrained({target!r})", message))
    loads_in_a_child(calls)
    assert listing(tmp_path) == before
