"""The kernel tests need the compiled kernels: they skip where none can be built here (no C++
compiler, or LEAPLLM_CPU_KERNELS=0) and fail where a compiler is there but the build fails."""

from __future__ import annotations

import pytest

from leapllm import kernels


@pytest.fixture(scope="session")
def built_kernels():
    ext = kernels.cpu_kernels()
    if ext is None:
        if kernels.disabled() or kernels.find_compiler() is None:
            pytest.skip(f"leapllm CPU kernels unavailable: {kernels.why_unavailable()}")
        pytest.fail(f"leapllm CPU kernels failed to build with {kernels.find_compiler()}:\n{kernels.build_error()}",
                    pytrace=False)
    return ext
