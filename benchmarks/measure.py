"""Measuring on a shared machine: the environment, timings, matmul peaks, memory probes and
profiles the benchmarks report. Every figure they print is a ratio of two things measured in
the same run, interleaved."""

from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s), for MFU on CUDA devices
# whose name contains the key; the measured matmul peak is reported beside it.
CUDA_BF16_PEAKS = {  # first match wins: "NVIDIA H100 80GB HBM3" is the SXM part
    "H200": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100 NVL": 835.5e12,
    "H100": 989.4e12,
    "A100": 312.0e12,
    "L40S": 362.05e12,
    "L4": 121.0e12,
    "A10": 125.0e12,
}


def cuda_bf16_peak(device: str = "cuda") -> Dict:
    """The device's name and its data-sheet dense bf16 peak (None when it is not in the table)."""
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in CUDA_BF16_PEAKS.items() if k in name), None)
    return {"device_name": name, "datasheet_bf16_flops_per_s": peak}


def environment() -> Dict:
    import platform

    import transformers

    flags = ""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    return dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_model=cpu_model(),
        cpu_isa=isa,
        os_cpu_count=os.cpu_count(),
        available_cores=available_cores(),
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        mkldnn=torch.backends.mkldnn.is_available(),
        mkl=torch.backends.mkl.is_available(),
        cpu_capability=getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        loadavg_at_start=list(os.getloadavg()),
    )


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_counters():
    """(seconds of busy CPU on the whole machine incl. steal, seconds of this process)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / _CLK  # user nice system irq softirq steal
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system


class Measured:
    """Wall time of a call plus how busy the machine was meanwhile: ``own_cores`` (CPU seconds
    of this process per wall second) and ``other_cores`` (everything else, steal included, per
    wall second; /proc/stat has 10 ms resolution). On a 2-core machine ``other_cores`` near 0
    means the measurement ran alone."""

    def __init__(self, fn: Callable[[], object]):
        busy0, own0 = _cpu_counters()
        start = time.perf_counter()
        self.result = fn()
        self.seconds = time.perf_counter() - start
        busy1, own1 = _cpu_counters()
        self.own_cores = (own1 - own0) / self.seconds
        self.other_cores = max(0.0, (busy1 - busy0) - (own1 - own0)) / self.seconds


def summary(xs: List[float]) -> Dict[str, float]:
    return {
        "median": statistics.median(xs),
        "min": min(xs),
        "max": max(xs),
        "mean": statistics.fmean(xs),
        "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "n": len(xs),
    }


def synchronized(fn: Callable[[], object], device: str = "cpu") -> Callable[[], object]:
    """``fn`` followed by a wait for the device's queued work (CUDA kernels run asynchronously)."""
    if torch.device(device).type != "cuda":
        return fn

    def call():
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return call


def peak_matmul(n: int = 2048, repeats: int = 10, warmup: int = 2, dtype=torch.float32, device: str = "cpu") -> Dict:
    """Best-of-``repeats`` FLOP/s of an ``n x n @ n x n`` matmul (fp32 unless told; 2 n^3 FLOPs)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    step = synchronized(lambda: torch.matmul(a, b, out=out), device)
    for _ in range(warmup):
        step()
    times = [timed(step) for _ in range(repeats)]
    flops = 2 * n**3
    return {
        "n": n,
        "flops": flops,
        "times_s": times,
        "best_flops_per_s": flops / min(times),
        "median_flops_per_s": flops / statistics.median(times),
    }


def matmul_probe(n: int = 2048, repeats: int = 2, dtype=torch.float32, device: str = "cpu") -> float:
    """A short peak probe (best of ``repeats`` n^3 matmuls) to interleave with other timings."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    step = synchronized(lambda: a @ b, device)
    if torch.device(device).type == "cuda":
        step()  # the first call loads the kernel
    return 2 * n**3 / min(timed(step) for _ in range(repeats))


def saved_tensor_bytes(fn: Callable[[], Dict[str, torch.Tensor]], exclude: List[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``fn`` (the loss
    forward), parameters excluded: the activation memory a step holds at its peak."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def rss_kib(field: str) -> int:
    m = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(m.group(1)) if m else -1


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM); Linux >= 4.0. False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
