"""leapllm's own CPU kernels (the C++ in cpu/), compiled on this machine the first time they are used.

    from leapllm.kernels import cpu_kernels
    ext = cpu_kernels()          # the compiled module, or None (then `why_unavailable()` says why)

The C++ is built with PyTorch's extension builder for the CPU it runs on (-march=native), so the
AVX-512 VNNI paths are used where the CPU has them and portable loops elsewhere. cpu/bindings.cpp is
the one translation unit; it includes every header of cpu/. The build is cached (PyTorch's extension
folder, TORCH_EXTENSIONS_DIR) under a name that carries a hash of those files, the flags and the
PyTorch version: two installs of different versions on one machine build side by side instead of
rebuilding over each other at every start, and installs of the same version share one build. A start
that finds its build there imports the library directly: importing PyTorch's builder takes longer
than loading the default model.
`python -m leapllm.kernels` builds it ahead of time (setup.sh does), and fails if a C++ compiler is
there but the build does not succeed. Set LEAPLLM_CPU_KERNELS=0 to run PyTorch's own kernels
instead, e.g. to measure the difference. Set LEAPLLM_CPU_MARCH to build for another CPU than this
one (a -march value: `haswell` runs the AVX2 tiles on an AVX-512 machine, `x86-64` the portable loops).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

SOURCE_DIR = Path(__file__).with_name("cpu")
SOURCE = SOURCE_DIR / "bindings.cpp"  # the translation unit the builder compiles
DISABLE_VARIABLE = "LEAPLLM_CPU_KERNELS"
MARCH_VARIABLE = "LEAPLLM_CPU_MARCH"

_failure: list[str] = []  # the last build attempt's error: its last line, then all of it


def source_files() -> list[Path]:
    """Every file the extension is compiled from: bindings.cpp and the headers it includes."""
    return sorted(SOURCE_DIR.glob("*.h")) + sorted(SOURCE_DIR.glob("*.cpp"))


def source_hash() -> str:
    """A hash of the sources' names and contents: a changed header changes it, and so the build."""
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def disabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "1") == "0"


def find_compiler() -> str | None:
    """The C++ compiler PyTorch's builder runs ($CXX, else c++), or g++ or clang++; None if there is none."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


@functools.cache
def _build():
    import torch  # noqa: F401 - the library links against libtorch: loaded first

    # The builder hashes only the files in `sources`, and ninja follows headers by their times alone:
    # with the hash of every file among the flags, any change to any of them rebuilds.
    march = os.environ.get(MARCH_VARIABLE) or "native"
    cflags = ["-O3", f"-march={march}", "-fopenmp", "-std=c++17", "-fno-math-errno",
              f"-DLEAPLLM_SOURCE_HASH={source_hash()}"]
    name = build_name(cflags)
    folder = build_folder(name)
    if (built := import_finished_build(name, folder)) is not None:
        return built
    from torch.utils import cpp_extension
    try:
        import ninja  # the pip package puts its binary next to the module; PyTorch's builder wants it on PATH
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    if shutil.which("ninja") is None:
        raise RuntimeError("ninja is not installed (pip install ninja)")
    if find_compiler() is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++ or clang++)")
    folder.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                              build_directory=str(folder), verbose=False)


def build_name(cflags: list[str]) -> str:
    """The extension's name, and so its folder in the build cache: the sources' hash, the flags and
    the PyTorch build it links against."""
    import torch

    digest = hashlib.sha256("\0".join([source_hash(), *cflags, torch.__version__]).encode()).hexdigest()[:12]
    return f"leapllm_cpu_kernels_{digest}"


def build_folder(name: str) -> Path:
    """Where the build named `name` goes: the folder PyTorch's builder picks by default
    ($TORCH_EXTENSIONS_DIR, else one in the user's cache per Python version and PyTorch accelerator),
    handed to it explicitly, so that a later start knows where to find the library without it."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        import torch
        from torch import _appdirs

        hip, cuda = getattr(torch.version, "hip", None), torch.version.cuda
        accelerator = f"rocm{hip.replace('.', '')}" if hip else f"cu{cuda.replace('.', '')}" if cuda else "cpu"
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions")),
                            f"{python}_{accelerator}")
    return Path(root) / name


def import_finished_build(name: str, folder: Path):
    """The library a finished build of `name` left in `folder`, imported as PyTorch's builder imports
    it; None where there is none, where a build is under way (it holds the folder's lock file), or
    where the library does not import (the builder then rebuilds or says why)."""
    library = folder / f"{name}.so"
    if not library.is_file() or (folder / "lock").exists():
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


def cpu_kernels():
    """The compiled kernels module, or None if disabled or not buildable here."""
    if disabled():
        return None
    if _failure:  # one failed build a process: the layers ask for the kernels at every step
        return None
    try:
        return _build()
    except Exception as e:  # no compiler, no ninja, a build error: PyTorch's kernels still work
        message = str(e).strip()
        _failure[:] = [f"{type(e).__name__}: {message.splitlines()[-1] if message else ''}",
                       f"{type(e).__name__}: {message}"]
        return None


def why_unavailable() -> str | None:
    if disabled():
        return f"disabled by {DISABLE_VARIABLE}=0"
    if cpu_kernels() is None:
        return _failure[0] if _failure else "not built"
    return None


def build_error() -> str | None:
    """The whole error of the last failed build (the compiler's output included), or None."""
    return _failure[1] if _failure and not disabled() and cpu_kernels() is None else None


def main() -> int:
    """Builds the kernels: 0 when built, disabled, or with no C++ compiler to build them (everything
    runs on PyTorch's kernels then); 1 when a compiler is there and the build fails, which CI must see."""
    if disabled():
        print(f"leapllm CPU kernels disabled by {DISABLE_VARIABLE}=0; PyTorch's kernels will be used", file=sys.stderr)
        return 0
    ext = cpu_kernels()
    if ext is None:
        compiler = find_compiler()
        if compiler is None:
            print("leapllm CPU kernels not built: no C++ compiler found; PyTorch's kernels will be used", file=sys.stderr)
            return 0
        print(f"leapllm CPU kernels failed to build with {compiler}:\n{build_error()}", file=sys.stderr)
        return 1
    tiles = "AVX-512 VNNI" if ext.vnni_compiled() else "AVX2" if ext.avx2_compiled() else "portable loops"
    print(f"leapllm CPU kernels built ({tiles} tiles)")
    return 0
