"""How a distillation run spreads over processes; both recipes talk to one of these.

:class:`SingleDevice` makes every collective the identity. :class:`DataParallel` (one process
per device, launched by torchrun / ``tune run --nproc_per_node N``):

* the **teacher** is sharded with FSDP2: ``fully_shard`` on every layer, then on the root,
  resharded after each forward. It is built on the meta device and its checkpoint is read one
  tensor at a time, each cut to this rank's shard, so no rank ever holds more than its shard
  plus one tensor (components.checkpointing.hf_bert.load_hf_encoder).
* the **student** is replicated and its gradients are summed over ranks once per optimizer
  step. Recursive students are small (12-20M parameters), their one shared layer runs N times
  per forward (per-layer FSDP would all-gather it N times), and stages freeze and unfreeze
  parameters, which DDP's gradient buckets do not follow. The losses are sums over tokens
  divided by the global token counts, so the summed gradient is exactly the gradient of one
  large batch.
* **data**: each rank takes its share of every global batch (components.data.mlm).

The CPU path uses gloo and makes no CUDA call; on CUDA, NCCL carries tensors and gloo objects.
"""

import contextlib
import os
from datetime import timedelta
from typing import Any, Iterator, List, Sequence

import torch
from torch import nn


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU."""
    from components.training.config import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available")
    return device


class SingleDevice:
    """One process on one device."""

    world_size = 1
    rank = 0

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # The teacher is not sharded on one device.
    shard_teacher = None

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        return flag

    def gather_objects(self, obj: Any) -> List[Any]:
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        """The main rank's ``obj`` on every rank."""
        return obj

    def barrier(self) -> None:
        pass

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on the main rank first (it may build files the others then reuse)."""
        yield

    def sync_gradients(self, params: Sequence[nn.Parameter]) -> None:
        pass

    def close(self) -> None:
        pass


# How long ranks wait for the main rank to prepare (download a teacher, tokenise a corpus):
# much longer than the default timeout of training collectives (10 minutes on NCCL).
PREPARE_TIMEOUT = timedelta(hours=12)


class DataParallel(SingleDevice):
    """One process per device: FSDP2-sharded teacher, replicated student, sharded data.

    Each process uses ``cuda:LOCAL_RANK`` (CUDA) or a share of the CPU cores. ``output_dir``
    must be on a filesystem every node can read: rank 0 writes checkpoints, every rank reads
    the one rank 0 chooses on resume.
    """

    def __init__(self, device: str = "auto"):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from components.training.config import ConfigError

        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                "The distributed recipe runs under torchrun: "
                "tune run --nproc_per_node N recipes/distill_recursive_distributed.py --config ..."
            )
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        kind = resolve_device(device).type
        if kind == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
            dist.init_process_group("cuda:nccl,cpu:gloo", device_id=self.device)
        elif kind == "cpu":
            self.device = torch.device("cpu")
            dist.init_process_group("gloo")
            # processes on one machine share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        else:
            raise ConfigError(f"The distributed recipe runs on CUDA or CPU, not {kind!r}")
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        # Python objects and the long wait for the main rank go through gloo, with its own timeout.
        self._objects = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
        self._dist = dist

    def shard_teacher(self, encoder: nn.Module) -> None:
        """FSDP2 on every layer, then the root; parameters resharded after each forward."""
        from torch.distributed.fsdp import fully_shard

        for layer in encoder.layers:
            fully_shard(layer, mesh=self.mesh, reshard_after_forward=True)
        fully_shard(encoder, mesh=self.mesh, reshard_after_forward=True)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        result = tensor.detach().to(self.device, copy=True)
        self._dist.all_reduce(result)
        return result.to(tensor.device)

    def any(self, flag: bool) -> bool:
        return bool(self.reduce_sum(torch.tensor([float(flag)])).item() > 0)

    def gather_objects(self, obj: Any) -> List[Any]:
        gathered: List[Any] = [None] * self.world_size
        self._dist.all_gather_object(gathered, obj, group=self._objects)
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=0, group=self._objects)
        return box[0]

    def barrier(self) -> None:
        self._dist.barrier(group=self._objects)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def sync_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Sum the gradients of the replicated student (and loss projection) over ranks."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        self._dist.all_reduce(flat)
        for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(summed)

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()
