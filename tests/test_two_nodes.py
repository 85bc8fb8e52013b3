"""The distributed recipe on two "nodes" on this machine, the way a cluster launches it.

Two torchrun launches at once (``--nnodes 2 --node-rank 0|1``, 2 processes each, gloo on
localhost), each node with its own caches (``RECURSIVE_DISTILL_CACHE`` and ``HF_DATASETS_CACHE``)
or both with one shared cache. tests/counting_store_launcher.py records every token store a
process builds. Each node-local cache is filled once by its node's first rank; a shared one
once in all, by rank 0; and the four ranks follow one device's loss trajectory.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import REPO
from tests.recipe_helpers import logged, run_recipe, tiny_config

pytestmark = pytest.mark.slow  # two torchrun launches of 2 processes each, at once
STEPS = 4
NODES, PER_NODE = 2, 2
OVERRIDES = {
    "max_steps": STEPS,
    "save_every_n_steps": None,  # one checkpoint and one evaluation, at the end
    "student.dropout": 0.0,  # dropout draws differ across ranks
    "student.attention_dropout": 0.0,
    "data.max_eval_windows": 16,
}
GLOBAL_BATCH = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(config: Path, output_dir: Path, caches, build_log: Path, timeout: int = 600):
    """Both nodes' torchrun at once; ``caches[node]`` is that node's cache folder. Returns
    each node's (return code, output)."""
    port = free_port()
    nodes = []
    for node in range(NODES):
        env = {
            **os.environ,
            "RECURSIVE_DISTILL_CACHE": str(caches[node] / "store"),
            "HF_DATASETS_CACHE": str(caches[node] / "datasets"),
            "STORE_BUILD_LOG": str(build_log),
        }
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(NODES), "--node-rank", str(node), "--nproc-per-node", str(PER_NODE),
            "--master-addr", "127.0.0.1", "--master-port", str(port),
            "tests/counting_store_launcher.py", "--config", str(config), f"output_dir={output_dir}",
        ]  # fmt: skip
        nodes.append(
            subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # so that a hang can be ended with all its workers
            )
        )
    results = []
    try:
        for p in nodes:
            output, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, output))
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return results


@pytest.fixture(scope="module")
def two_nodes_setup(tmp_path_factory, teacher_dir, corpus_file):
    """One device's run with the global batch (16 windows), and the config that gives each of
    the 4 ranks a quarter of it."""
    root = tmp_path_factory.mktemp("two_nodes")
    single = root / "single"
    run_recipe(tiny_config(single, teacher_dir, corpus_file, **OVERRIDES, **{"data.batch_size": GLOBAL_BATCH}))
    config = root / "dist.yaml"
    per_rank = GLOBAL_BATCH // (NODES * PER_NODE)
    cfg = tiny_config(root / "unused", teacher_dir, corpus_file, **OVERRIDES, **{"data.batch_size": per_rank})
    OmegaConf.save(OmegaConf.create(cfg), config)
    return single, config


def stores(cache: Path):
    """{store folder name: {file name: bytes}} in a cache."""
    root = cache / "store" / "stores"
    return {d.name: {f.name: f.read_bytes() for f in sorted(d.iterdir())} for d in sorted(root.iterdir())}


@pytest.mark.parametrize("shared", [False, True], ids=["node-local-caches", "shared-cache"])
def test_two_nodes_build_the_store_once_per_cache_and_follow_one_device(two_nodes_setup, tmp_path, shared):
    single, config = two_nodes_setup
    caches = [tmp_path / "shared"] * NODES if shared else [tmp_path / f"node{n}" for n in range(NODES)]
    build_log = tmp_path / "builds.jsonl"
    build_log.touch()
    out = tmp_path / "out"
    results = launch_two_nodes(config, out, caches, build_log)
    for node, (code, output) in enumerate(results):
        assert code == 0, f"node {node}:\n{output[-4000:]}"

    builds = [json.loads(line) for line in build_log.read_text().splitlines()]
    # the training and the held-out stores, each built once per cache and by nobody else
    names = {Path(b["folder"]).name for b in builds}
    assert len(names) == 2, builds
    for node in range(1 if shared else NODES):
        cache = caches[node]
        here = [b for b in builds if Path(b["folder"]).parent == cache / "store" / "stores"]
        assert Counter(Path(b["folder"]).name for b in here) == {name: 1 for name in names}, builds
        # rank 0 first, then the first rank of each other node
        assert {(b["rank"], b["local_rank"]) for b in here} == {(0, 0) if node == 0 else (node * PER_NODE, 0)}, builds
        assert set(stores(cache)) == names  # and no temporary store was left behind
    assert len(builds) == (2 if shared else 2 * NODES), builds
    if not shared:  # both nodes built the same stores (same keys, same bytes)
        assert stores(caches[0]) == stores(caches[1])

    a, b = logged(single), logged(out)
    assert set(range(1, STEPS + 1)) <= set(a) and set(range(1, STEPS + 1)) <= set(b)
    for step in range(1, STEPS + 1):
        for key in ("loss/total", "loss/mlm", "loss/output", "loss/hidden", "loss/attention", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
    assert "eval/student_mlm_loss" in b[STEPS]  # (its masks depend on the per-rank batch size)
