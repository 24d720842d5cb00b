"""The machine's measured limits: peak streaming bandwidth and peak matmul FLOP/s.

Measured once per device, thread count and torch version, and cached as JSON in the user's cache
folder (`$XDG_CACHE_HOME/leapllm/machine.json`, else `~/.cache/leapllm/machine.json`);
`leapllm profile --machine` measures again. These are what PyTorch reaches on this machine with
this many threads, which is the fair ceiling for a PyTorch engine, not the datasheet numbers.

- bandwidth: `torch.sum` over a float32 tensor much larger than the caches (the best of a few runs),
  counted as bytes read per second;
- FLOP/s: square `torch.matmul`s (2 n^3 FLOPs each) in float32 and bfloat16 (and float16 on CUDA),
  the best of a few runs;
- int8 (CPUs where leapllm's kernels build): the multiply-add rate of the int8 instruction its tiles
  are made of (kernels/cpu/int8_peak.h), 2 operations a product, the ceiling of the stages that run
  on the tiles.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from leapllm.profiling.stages import clock_for


@dataclass
class MachineLimits:
    device: str  # "cpu" or "cuda:0"
    name: str  # the processor or GPU model
    threads: int  # torch CPU threads during the measurement
    torch_version: str
    bandwidth: float  # bytes/s, streaming read
    flops: dict[str, float]  # dtype name -> matmul FLOP/s
    measured_at: str = ""
    int8_method: int = 0  # INT8_PEAK_METHOD when flops["int8"] was measured
    from_cache: bool = field(default=False, compare=False)

    @property
    def key(self) -> str:
        return machine_key(self.device, self.name, self.threads, self.torch_version)

    def peak_flops(self, dtype: str | torch.dtype) -> float:
        """Peak matmul FLOP/s in `dtype`; float16 falls back to bfloat16's figure when not measured."""
        name = str(dtype).removeprefix("torch.")
        if name in self.flops:
            return self.flops[name]
        if name == "float16" and "bfloat16" in self.flops:
            return self.flops["bfloat16"]
        return self.flops["float32"]

    def balance(self, dtype: str | torch.dtype) -> float:
        """FLOPs per byte at which a stage stops being memory-bound (the roofline's ridge point)."""
        return self.peak_flops(dtype) / self.bandwidth

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("from_cache")
        return d


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def machine_key(device: str, name: str, threads: int, torch_version: str) -> str:
    kind = torch.device(device).type
    where = f"{threads} threads" if kind == "cpu" else kind
    return f"{name} | {where} | torch {torch_version}"


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "leapllm" / "machine.json"


def _best_seconds(fn, clock, repeats: int, inner: int = 1) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        clock.synchronize()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        clock.synchronize()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second that `torch.sum` reads from a float32 tensor of `nbytes`."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    seconds = _best_seconds(lambda: torch.sum(x), clock_for(device), repeats, inner=3 if device.type == "cuda" else 1)
    return x.numel() * 4 / seconds


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of an n x n by n x n matmul in `dtype` (2 n^3 FLOPs)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    seconds = _best_seconds(lambda: torch.matmul(a, b), clock_for(device), repeats,
                            inner=5 if device.type == "cuda" else 1)
    return 2 * n**3 / seconds


# Which int8_peak_ops measured a cached int8 figure: 1 let the compiler hoist the maddubs out of the
# AVX2 loop (it timed the adds alone, about half the rate); entries from before are measured again.
INT8_PEAK_METHOD = 2


def measure_int8_ops(repeats: int = 5, iterations: int = 20_000_000) -> float | None:
    """Operations per second of the kernels' int8 instruction on every thread; None without the kernels."""
    from leapllm.kernels import cpu_kernels

    ext = cpu_kernels()
    if ext is None:
        return None
    best = max(ext.int8_peak_ops(iterations) for _ in range(repeats))
    return best if best > 0 else None


def measure_machine(device: torch.device | str = "cpu", *, bandwidth_bytes: int | None = None,
                    matmul_n: int | None = None, repeats: int = 5) -> MachineLimits:
    """Measure the device now (a few seconds on a CPU). Smaller sizes make it faster and less exact."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    bandwidth_bytes = bandwidth_bytes or (2 << 30 if cuda else 512 << 20)
    matmul_n = matmul_n or (8192 if cuda else 2048)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if cuda else [])
    with torch.inference_mode():
        bandwidth = measure_bandwidth(device, bandwidth_bytes, repeats)
        flops = {str(dt).removeprefix("torch."): measure_matmul_flops(device, dt, _matmul_size(device, dt, matmul_n),
                                                                      repeats) for dt in dtypes}
        if not cuda and (int8 := measure_int8_ops(repeats)):
            flops["int8"] = int8
    return MachineLimits(
        device=str(device), name=device_name(device), threads=torch.get_num_threads(),
        torch_version=torch.__version__, bandwidth=bandwidth, flops=flops,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        int8_method=INT8_PEAK_METHOD if "int8" in flops else 0,
    )


def _matmul_size(device: torch.device, dtype: torch.dtype, n: int) -> int:
    """n, but at most 512 for bfloat16 on a CPU that emulates it (no AVX-512 BF16): about 1 GFLOP/s
    there, so a 2048^3 matmul took 18 s a call and the first `leapllm profile` two minutes."""
    emulated = device.type == "cpu" and dtype == torch.bfloat16 and not torch.cpu._is_avx512_bf16_supported()
    return min(n, 512) if emulated else n


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_machine(limits: MachineLimits, cache_path: str | Path | None = None) -> Path:
    """Store `limits` in the cache file under its key (other devices' entries are kept)."""
    from leapllm.output_files import atomic_write

    path = Path(cache_path) if cache_path is not None else default_cache_path()
    data = _read_cache(path)
    data[limits.key] = limits.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2) + "\n")
    return path


def load_machine(device: torch.device | str, cache_path: str | Path | None = None) -> MachineLimits | None:
    """The cached limits for this device, thread count and torch version, or None."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    key = machine_key(str(device), device_name(device), torch.get_num_threads(), torch.__version__)
    entry = _read_cache(path).get(key)
    if not isinstance(entry, dict):
        return None
    try:
        limits = MachineLimits(**entry, from_cache=True)
    except TypeError:  # written by another version: measure again
        return None
    stale_int8 = "int8" not in limits.flops or limits.int8_method != INT8_PEAK_METHOD
    if device.type == "cpu" and stale_int8 and _kernels_built():
        return None  # measured before the int8 ceiling was, or by a flawed loop: measure again
    return limits


def _kernels_built() -> bool:
    from leapllm.kernels import cpu_kernels

    return cpu_kernels() is not None


def machine_limits(device: torch.device | str = "cpu", *, cache_path: str | Path | None = None,
                   remeasure: bool = False, on_measure=None, **measure_kwargs) -> MachineLimits:
    """The limits from the cache, measuring (and caching) them when absent or when `remeasure`.

    `on_measure()` is called just before a measurement starts (to tell the user why it waits).
    """
    if not remeasure:
        cached = load_machine(device, cache_path)
        if cached is not None:
            return cached
    if on_measure is not None:
        on_measure()
    limits = measure_machine(device, **measure_kwargs)
    save_machine(limits, cache_path)
    return limits
