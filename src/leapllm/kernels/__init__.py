"""leapllm's own CPU kernels (cpu_kernels.cpp), compiled on this machine the first time they are used.

    from leapllm.kernels import cpu_kernels
    ext = cpu_kernels()          # the compiled module, or None (then `why_unavailable()` says why)

The C++ source is built with PyTorch's extension builder for the CPU it runs on (-march=native), so
the AVX-512 VNNI paths are used where the CPU has them and portable loops elsewhere; the build is
cached (PyTorch's extension folder, TORCH_EXTENSIONS_DIR) and redone only when the source changes.
`python -m leapllm.kernels` builds it ahead of time (setup.sh does). Set LEAPLLM_CPU_KERNELS=0 to
run PyTorch's own kernels instead, e.g. to measure the difference.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
DISABLE_VARIABLE = "LEAPLLM_CPU_KERNELS"

_failure: list[str] = []  # why the last build attempt failed, for messages


@functools.cache
def _build():
    from torch.utils import cpp_extension
    try:
        import ninja  # the pip package puts its binary next to the module; PyTorch's builder wants it on PATH
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    if shutil.which("ninja") is None:
        raise RuntimeError("ninja is not installed (pip install ninja)")
    return cpp_extension.load(
        name="leapllm_cpu_kernels", sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-std=c++17", "-fno-math-errno"], extra_ldflags=["-fopenmp"], verbose=False,
    )


def cpu_kernels():
    """The compiled kernels module, or None if disabled or not buildable here."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return None
    try:
        return _build()
    except Exception as e:  # no compiler, no ninja, a build error: PyTorch's kernels still work
        _failure[:] = [f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"]
        return None


def why_unavailable() -> str | None:
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return f"disabled by {DISABLE_VARIABLE}=0"
    if cpu_kernels() is None:
        return _failure[0] if _failure else "not built"
    return None


def main() -> int:
    ext = cpu_kernels()
    if ext is None:
        print(f"leapllm CPU kernels unavailable: {why_unavailable()}; PyTorch's kernels will be used", file=sys.stderr)
        return 0  # not fatal: everything runs without them
    tiles = "AVX-512 VNNI" if ext.vnni_compiled() else "AVX2" if ext.avx2_compiled() else "portable loops"
    print(f"leapllm CPU kernels built ({tiles} tiles)")
    return 0
