"""Distil a BERT-family teacher into a recursive student on several devices or nodes.

    tune run --nproc_per_node N recipes/distill_recursive_distributed.py --config configs/bert_large.yaml [key=value ...]
    # several nodes: torchrun's usual flags, e.g. --nnodes 2 --node_rank 0 --rdzv_endpoint host:29500

The same configs and keys as recipes/distill_recursive.py, and the same recipe: only the
parallel strategy differs (components/training/parallel.py). The teacher is sharded with
FSDP2 (per layer) and loaded shard by shard, the student is sharded with FSDP2 at its root,
and each rank takes its share of every global batch (``data.batch_size`` windows per
micro-batch per rank). Rank 0 alone logs, shows progress and writes checkpoints and the
student; a checkpoint resumes with the same number of processes and the same losses. CPU runs
use gloo, CUDA runs NCCL. On several nodes ``output_dir`` must be shared; the token store
(``$RECURSIVE_DISTILL_CACHE``) may be: it is built once in all when it is, else once per node
by the node's first rank (tests/test_two_nodes.py).
"""

import sys

from omegaconf import DictConfig

from components.config import parse
from components.training.parallel import DataParallel
from recipes.distill_recursive import DistillRecursiveRecipe, main


class DistillRecursiveDistributedRecipe(DistillRecursiveRecipe):
    """The single-device recipe with the data-parallel strategy."""

    def make_parallel(self) -> DataParallel:
        return DataParallel(self.cfg.device)


@parse
def recipe_main(cfg: DictConfig) -> None:
    main(DistillRecursiveDistributedRecipe, cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
