"""What the bench measures with: clocks around forward calls, ops dispatched, peak memory, the CPU used by other processes, the machine, the memory-bandwidth roof."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# --- measuring -----------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_memory(device: str) -> tuple[int, str]:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda max_memory_allocated"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "RSS high-water (VmHWM)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS high-water of the process (ru_maxrss)"


class ForwardTimer:
    """Adds up the time spent inside a module's forward calls (hooks; synchronised on CUDA), apart
    for decode steps (one new position per row) and prefills (more). Calls replayed from a CUDA
    graph run no hooks: for such code the caller's own clock is the one to read."""

    def __init__(self, module: torch.nn.Module, device: str):
        self.seconds = self.decode_seconds = 0.0
        self.calls = self.decode_calls = 0
        self._start, self._decode = 0.0, False
        self._device = device
        self._handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True), module.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._decode = ids is not None and ids.shape[-1] == 1
        sync(self._device)
        self._start = time.perf_counter()

    def _post(self, *_):
        sync(self._device)
        seconds = time.perf_counter() - self._start
        self.seconds += seconds
        self.calls += 1
        if self._decode:
            self.decode_seconds += seconds
            self.decode_calls += 1

    @property
    def prefill_seconds(self) -> float:
        return self.seconds - self.decode_seconds

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# ops that only make or reshape a tensor's metadata (no kernel on a GPU), beside the views
_NO_KERNEL = {"empty", "empty_strided", "_unsafe_view", "lift_fresh", "_reshape_alias", "set_", "resize_", "_local_scalar_dense"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is on, by name: what the host issues one by one (on a
    GPU, a kernel launch each, near enough), whatever the device. Views and ops that only make a
    tensor's metadata are left out (`_NO_KERNEL`). Code run inside `one_kernel()` counts as one op:
    a stand-in for a kernel that is one launch on a GPU (batch.decode_attention.reference_kernel for
    efficient_attention_kernel)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.reads = 0  # a tensor's value read on the host (item(), bool(), int()): on a GPU, the host waits for the device
        self._inside = 0
        self._on = 0  # (entered: `one_kernel`'s calls count only then)

    def __enter__(self):
        self._on += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._on -= 1
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside and not func.is_view and name not in _NO_KERNEL:
            self.ops[name] += 1
        self.reads += name == "_local_scalar_dense" and not self._inside
        return func(*args, **(kwargs or {}))

    def one_kernel(self, kernel):
        """`kernel`, counted as one op however many it dispatches."""
        def counted(*args, **kwargs):
            if self._on and not self._inside:
                self.ops[getattr(kernel, "__name__", "kernel")] += 1
            self._inside += 1
            try:
                return kernel(*args, **kwargs)
            finally:
                self._inside -= 1
        return counted


def busy_cpu_seconds() -> float | None:
    """CPU time the whole machine has spent busy since boot (from /proc/stat), all cores together."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def wait_for_quiet(max_seconds: float, threshold: float = 0.15, window: float = 2.0) -> float:
    """Wait (at most max_seconds) until other processes use under `threshold` of the machine's CPU
    over a `window`; returns the seconds waited. The machine may be shared: see CpuProbe."""
    waited, said = 0.0, False
    while waited < max_seconds:
        probe = CpuProbe()
        time.sleep(window)
        share = probe.stop()["others_cpu_share"]
        if share is None or share < threshold:
            break
        waited += window
        if not said:
            print(f"bench: other processes use {share:.0%} of the CPU; waiting up to {max_seconds:.0f}s for quiet", file=sys.stderr, flush=True)
            said = True
    return waited


class CpuProbe:
    """How busy the machine was with *other* processes while a mode ran: their share of all cores.
    Anything well above 0 distorts the figures (2 cores: a second busy process can halve them, and
    OpenMP threads waiting on a descheduled sibling can cost far more)."""

    def __init__(self):
        self.wall0, self.busy0, self.own0 = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
        self.load0 = os.getloadavg()[0]

    def stop(self) -> dict:
        wall = time.perf_counter() - self.wall0
        busy, own = busy_cpu_seconds(), own_cpu_seconds() - self.own0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        others = None if busy is None or self.busy0 is None else max(0.0, (busy - self.busy0 - own) / (wall * (os.cpu_count() or 1)))
        return {"own_cpu_seconds": round(own, 2), "own_cores_used": round(own / wall, 2) if wall else None,
                "others_cpu_share": None if others is None else round(min(others, 1.0), 3),
                "load_average": [round(self.load0, 2), round(os.getloadavg()[0], 2)], "cores": cores}


def inner_model(model):
    """The transformers model under a PeftModel (whose forward every generate step goes through)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def machine_info(device: str) -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": device,
    }
    for pkg in ("transformers", "peft", "bitsandbytes"):
        with contextlib.suppress(Exception):
            info[pkg] = __import__(pkg).__version__
    return info


def quantiles(values: list[int]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {"min": int(a.min()), "p10": float(np.percentile(a, 10)), "p25": float(np.percentile(a, 25)),
            "p50": float(np.percentile(a, 50)), "p75": float(np.percentile(a, 75)),
            "p90": float(np.percentile(a, 90)), "max": int(a.max()), "mean": float(a.mean())}


def dist_line(d: dict, max_new: int) -> str:
    if not d:
        return "-"
    return (f"min {d['min']}, p10 {d['p10']:.0f}, p25 {d['p25']:.0f}, median {d['p50']:.0f}, p75 {d['p75']:.0f}, "
            f"p90 {d['p90']:.0f}, max {d['max']} (of {max_new}); {d['within_4']:.0%} within 4 tokens, "
            f"{d['at_max']:.0%} at max_new_tokens")



# --- the memory-bandwidth roof -------------------------------------------------------------------


# Peak memory bandwidth by GPU name (vendors' datasheets), for the share of the roof: the first match wins
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100 80GB", 2.0e12), ("A100-SXM4-80GB", 2.0e12)]


def peak_bandwidth(gpu: str | None) -> float | None:
    """The GPU's peak memory bandwidth in bytes/s, from its name (PEAK_BANDWIDTH); None if unknown."""
    return next((bw for key, bw in PEAK_BANDWIDTH if gpu and key in gpu), None)


def resident_weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter as stored (4-bit layers: packed weights
    and their quantization state), except the input embeddings, of which it reads a row per token."""
    import bitsandbytes as bnb

    from batch.loading import nf4_bytes

    embeddings = model.get_input_embeddings().weight
    total = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            total += nf4_bytes(m) + (m.bias.nbytes if m.bias is not None else 0)
        else:
            total += sum(p.nbytes for p in m.parameters(recurse=False) if p is not embeddings)
    return total


def roof_share(mode: dict, weight_bytes: int, kv_bytes_per_token: int, prompt_lengths: list[int], bandwidth: float) -> float | None:
    """Bytes the decode steps had to read over their time, against the peak bandwidth: the weights
    once per step, and for every row's k-th decode step the KV cache of its prompt and k tokens (the
    rows' real tokens only: padding and rows kept past their end count as waste, not as work)."""
    seconds, steps = mode.get("decode_seconds"), mode.get("decode_steps")
    if not seconds or not steps:
        return None
    kv_tokens = sum((k - 1) * p + (k - 1) * k // 2 for p, k in zip(prompt_lengths, mode["_kept"]) if k > 1)
    return (steps * weight_bytes + kv_tokens * kv_bytes_per_token) / seconds / bandwidth
