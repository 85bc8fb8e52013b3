"""How a distillation run spreads over processes; both recipes talk to one of these.

``SingleDevice`` makes every collective the identity. ``DataParallel`` (one process
per device, launched by torchrun / ``tune run --nproc_per_node N``):

* the **teacher** is sharded with FSDP2: ``fully_shard`` on every layer, then on the root,
  resharded after each forward. It is built on the meta device and its checkpoint is read one
  tensor at a time, each cut to this rank's shard, so no rank ever holds more than its shard
  plus one tensor (components.checkpointing.hf_bert.load_hf_encoder).
* the **student** is sharded with FSDP2 at its root: one all-gather per forward and per
  backward however many times its shared layer runs (per-layer wrapping would all-gather the
  shared layer N times). Measured on 2 CPU ranks it was as fast as a replicated student and
  holds half of it per rank; unlike DDP's buckets it also follows stages that freeze and
  unfreeze parameters. The loss module's projection (when widths differ) stays replicated.
  Each rank's loss is its share of the global mean (token sums over global token counts), and
  FSDP averages gradients over ranks, so each rank back-propagates its loss times the number
  of ranks (``loss_scale``): the result is exactly the gradient of one large batch.
* **data**: each rank takes its share of every global batch (components.data.mlm).
* **preparing files** (``main_first``: the teacher download, the ``datasets``
  cache, the tokenised store under ``$RECURSIVE_DISTILL_CACHE``) runs in three waves: global
  rank 0, then the first rank of every other node (``LOCAL_RANK`` 0), then everyone else, with
  a barrier between waves. A cache may be shared by all nodes or local to each, and nothing
  has to say which: rank 0 fills a shared one alone and every other rank finds it; a node-local
  one is filled once per node by its first rank, which runs alone on its node, and found by the
  node's other ranks. (Were it rank 0 and then all the others at once, every rank of another
  node would find its node's cache empty and tokenise the whole corpus into its own temporary
  store: N times the CPU and transient disk.) The cost is one more barrier.

The CPU path uses gloo and makes no CUDA call; on CUDA, NCCL carries tensors and gloo objects.
"""

import contextlib
import os
from datetime import timedelta
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    StateDictOptions,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from components.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available")
    return device


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> Optional[bool]:
    """Whether this CPU has bf16 matrix instructions (x86: AVX512_BF16 or AMX-BF16; ARM: BF16),
    read from the first ``flags`` / ``Features`` line of ``cpuinfo``; ``None`` where it cannot be
    told (no such file, as on macOS). Without them bf16 matmuls are emulated: slower than fp32
    (``benchmarks/run.py --quick`` measured a bf16 teacher at 0.27x on an AVX2-only CPU)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), None)
    except OSError:
        return None
    if flags is None:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags or "bf16" in flags  # (the last: ARM's Features)


def resolve_dtype(requested: str, device: torch.device, cpu_native: Optional[bool] = None) -> Tuple[bool, str]:
    """What a run's ``dtype`` key means on ``device``: ``(bf16, why)``, where ``bf16`` says whether
    the forward passes run under bf16 autocast and ``why`` is the sentence the run logs.

    ``fp32`` and ``bf16`` are taken as given (bf16 on a CUDA device without it is a ConfigError;
    on a CPU without bf16 instructions it runs, and the recipe warns). ``auto`` is bf16 where the
    device computes it natively: CUDA devices that support it, CPUs with AVX512_BF16, AMX-BF16
    or ARM's BF16 (``cpu_native``, else read by :func:`cpu_has_native_bf16`); fp32 elsewhere.
    """
    if requested not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"dtype must be auto, fp32 or bf16, got {requested!r}")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        supported = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not supported:
            raise ConfigError(f"dtype=bf16 but {name} does not support bf16")
        if requested == "auto":
            return (
                supported,
                f"dtype=auto: {'bf16' if supported else 'fp32'}, {name} {'supports' if supported else 'does not support'} bf16",
            )
    elif requested == "auto":
        if device.type != "cpu":
            return False, f"dtype=auto: fp32 on {device.type}"
        native = cpu_has_native_bf16() if cpu_native is None else cpu_native
        if native:
            return True, "dtype=auto: bf16, this CPU has bf16 instructions (AVX512_BF16, AMX or ARM BF16)"
        told = "has no bf16 instructions" if native is False else "does not say whether it has bf16 instructions"
        return False, f"dtype=auto: fp32, this CPU {told} (bf16 would be emulated, slower than fp32)"
    return requested == "bf16", f"dtype={requested}"


def bf16_cpu_warning(device: torch.device, what: Sequence[str], native: Optional[bool] = None) -> Optional[str]:
    """A warning when bf16 work (``what``: config keys asking for it) runs on a CPU without
    native bf16; ``None`` when there is nothing to say."""
    native = cpu_has_native_bf16() if native is None else native
    if device.type != "cpu" or not what or native is not False:
        return None
    return (
        f"{' and '.join(what)} on a CPU without bf16 instructions (no AVX512_BF16 or AMX): its bf16 matmuls are "
        "emulated and slower than fp32 (0.27x measured on an AVX2-only CPU). Use fp32 or dtype=auto here; bf16 pays "
        "on GPUs and on CPUs with those instructions (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later)"
    )


def log_precision(logger, device: torch.device, why: str, bf16_keys: Sequence[str]) -> None:
    """Say at setup what a run computes in: ``why`` (from :func:`resolve_dtype`) at INFO, after
    :func:`bf16_cpu_warning`'s warning when ``bf16_keys`` (the config keys asking for bf16) would
    run emulated on this CPU."""
    warning = bf16_cpu_warning(device, bf16_keys)
    if warning:
        logger.warning(warning)
    logger.info("Compute dtype: %s", why)


class SingleDevice:
    """One process on one device."""

    world_size = 1
    rank = 0
    local_rank = 0  # on this node

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # The teacher is not sharded on one device.
    shard_teacher = None

    @property
    def loss_scale(self) -> int:
        """What each rank multiplies its loss by before backward (gradients are averaged)."""
        return self.world_size

    def shard_student(self, student: nn.Module) -> None:
        pass

    def set_gradient_sync(self, student: nn.Module, enabled: bool) -> None:
        """Whether this backward synchronises gradients (only the last micro-batch needs to)."""

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

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Make ``module``'s parameters and buffers rank 0's (before sharding)."""

    def barrier(self) -> None:
        pass

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on the main rank first, then on the first rank of each other node,
        then on the rest (it may build files the others then reuse): see the module docstring."""
        yield

    def sync_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Average the gradients of replicated (not sharded) parameters over ranks."""

    def state_dicts(self, trainable: nn.Module, optimizer: torch.optim.Optimizer):
        """(model, optimizer) state dicts with full tensors, on the main rank (empty elsewhere)."""
        options = _full_options(cpu_offload=self.world_size > 1)
        return (
            get_model_state_dict(trainable, options=options),
            get_optimizer_state_dict(trainable, optimizer, options=options),
        )

    def load_state_dicts(self, trainable: nn.Module, optimizer, model_state, optimizer_state) -> None:
        """Load full state dicts (every rank passes the same ones) into possibly sharded modules."""
        set_model_state_dict(trainable, model_state, options=_full_options())
        # parameters that never had a gradient have no AdamW state yet
        set_optimizer_state_dict(trainable, optimizer, optimizer_state, options=_full_options(strict=False))

    def full_student(self, student: nn.Module) -> Optional[nn.Module]:
        """The whole student, unsharded, on the main rank (``None`` elsewhere)."""
        return student

    def close(self) -> None:
        pass


def _full_options(**kwargs):
    return StateDictOptions(full_state_dict=True, **kwargs)


def clip_gradients(params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the total gradient norm of sharded (DTensor) and plain gradients together; returns
    the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = []
    for group in ([g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]):
        if group:
            norm = torch.nn.utils.get_total_norm(group)
            norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float().cpu())
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    coefficient = max_norm / (float(total) + 1e-6)
    if coefficient < 1:
        for g in grads:
            g.mul_(coefficient)
    return total


# How long ranks wait for the main rank to prepare (download a teacher, tokenise a corpus):
# much longer than the default timeout of training collectives (10 minutes on NCCL).
PREPARE_TIMEOUT = timedelta(hours=12)


class DataParallel(SingleDevice):
    """One process per device: FSDP2-sharded teacher and student, sharded data.

    Each process uses ``cuda:LOCAL_RANK`` (CUDA) or a share of the CPU cores. ``output_dir``
    must be on a filesystem every node can read: rank 0 writes checkpoints, every rank reads
    the one rank 0 chooses on resume.
    """

    def __init__(self, device: str = "auto"):
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                "The distributed recipe runs under torchrun: "
                "tune run --nproc_per_node N recipes/distill_recursive_distributed.py --config ..."
            )
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = local_rank = int(os.environ.get("LOCAL_RANK", 0))  # (torchrun sets it)
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

    def shard_student(self, student: nn.Module) -> None:
        fully_shard(student, mesh=self.mesh)

    def set_gradient_sync(self, student: nn.Module, enabled: bool) -> None:
        if hasattr(student, "set_requires_gradient_sync"):  # FSDP2; a replicated one syncs in sync_gradients
            student.set_requires_gradient_sync(enabled)

    def full_student(self, student: nn.Module) -> Optional[nn.Module]:
        state = get_model_state_dict(student, options=_full_options(cpu_offload=True))
        if not self.is_main:
            return None
        full = type(student)(**student.config)
        full.load_state_dict(state)
        return full

    def shard_teacher(self, encoder: nn.Module) -> None:
        """FSDP2 on every layer, then the root; parameters resharded after each forward."""
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

    def broadcast_parameters(self, module: nn.Module) -> None:
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                self._dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        self._dist.barrier(group=self._objects)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        # wave 0: global rank 0; wave 1: the first rank of every other node; wave 2: the rest.
        # Every rank passes the same two barriers: those before its wave, then those after it.
        wave = 0 if self.is_main else 1 if self.local_rank == 0 else 2
        for _ in range(wave):
            self.barrier()
        try:
            yield
        finally:
            for _ in range(wave, 2):
                self.barrier()

    def sync_gradients(self, params: Sequence[nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        self._dist.all_reduce(flat)
        flat /= self.world_size
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()
