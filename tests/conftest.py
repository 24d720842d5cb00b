"""Shared fixtures: the default model and the Hugging Face reference are loaded once per session."""

from __future__ import annotations

import pytest
import torch

from leapllm.loading.default_model import default_model_path


@pytest.fixture(scope="session")
def default_gguf_path():
    return default_model_path()


@pytest.fixture(scope="session")
def llm():
    """The default model in float32 on CPU, shared by every test that only reads from it."""
    from leapllm import LLM

    return LLM(dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_tokenizer(default_gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_gguf_path.parent), gguf_file=default_gguf_path.name)


@pytest.fixture(scope="session")
def hf_model(default_gguf_path):
    """The reference: transformers' own Llama on the same GGUF, dequantized to float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(default_gguf_path.parent), gguf_file=default_gguf_path.name, dtype=torch.float32
    )
    return model.eval()


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def embedder():
    """The default encoder (all-MiniLM-L6-v2) in float32 on CPU, shared by the encoder tests."""
    from leapllm.encoders.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def hf_encoder():
    """transformers' own BertModel and tokenizer on the same folder: the reference."""
    from transformers import AutoModel, AutoTokenizer

    from leapllm.loading.encoder_loader import default_encoder_path

    folder = str(default_encoder_path())
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def browser():
    """Chromium, one per test module (tests/browser.py)."""
    from tests.browser import launch_browser

    yield from launch_browser()


@pytest.fixture
def page_errors():
    """The script errors, console errors and dialogs of the pages a test opens (tests.browser.open_page)."""
    return []
