"""The package root: `from leapllm import LLM` works, and `import leapllm` alone imports no PyTorch."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_importing_the_package_imports_no_torch_until_llm_is_used():
    code = ("import sys, leapllm; before = 'torch' in sys.modules; from leapllm import LLM, SamplingParams; "
            "import leapllm.llm, leapllm.engine.sampling; "
            "print(before, LLM is leapllm.llm.LLM, SamplingParams is leapllm.engine.sampling.SamplingParams)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True"]


def test_an_unknown_name_is_an_attribute_error():
    import leapllm

    with pytest.raises(AttributeError, match="no_such_thing"):
        leapllm.no_such_thing  # noqa: B018
    assert {"LLM", "SamplingParams", "GenerationOutput", "ModelLoadError"} <= set(dir(leapllm))
