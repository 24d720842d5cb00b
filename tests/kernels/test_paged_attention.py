"""kernels/paged_attention.py: attention over a paged pool from per-sequence tables, in PyTorch (the
reference and the path without Triton) and as a Triton kernel (in Triton's interpreter on the CPU,
compiled on a GPU), against attention computed query by query."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from leapllm.kernels.paged_attention import paged_attention, paged_attention_torch
from tests.conftest import requires_cuda

BLOCK = 16
# (keys of the sequence after the step, its tokens in the step): decodes, whole prompts, chunks
# after a cached context, one sequence exactly a block long.
STEP = [(37, 1), (5, 5), (50, 13), (16, 1), (33, 33), (70, 2)]
CASES = [(None, None), (7, None), (None, 5.0), (20, 3.0)]  # (window, softcap)


def make_step(heads: int, kv_heads: int, head_dim: int, dtype=torch.float32, seed: int = 0, free_outside: int = 0):
    """A pool of shuffled blocks, each sequence's table (-1 past its blocks; with free_outside, also
    -1 for the blocks entirely before its last `free_outside` keys, as a sliding window frees them)
    and a query per token."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // BLOCK) for n, _ in STEP) + 3
    k = torch.randn(num_blocks * BLOCK, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks * BLOCK, kv_heads, head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // BLOCK) for n, _ in STEP) + 1
    tables = torch.full((len(STEP), width), -1, dtype=torch.int32)
    for s, (n, q) in enumerate(STEP):
        for b in range(-(-n // BLOCK)):
            if free_outside and (b + 1) * BLOCK <= n - q - free_outside:
                continue
            tables[s, b] = order.pop()
    starts = [0]
    for _, q in STEP:
        starts.append(starts[-1] + q)
    q = torch.randn(starts[-1], heads, head_dim, generator=g).to(dtype)
    lens = torch.tensor([n for n, _ in STEP], dtype=torch.int32)
    return q, k, v, tables, lens, torch.tensor(starts, dtype=torch.int32)


def per_query(q, k, v, tables, lens, starts, scale, softcap=None, window=None) -> torch.Tensor:
    """Each query alone: its sequence's keys at or before it (the last `window` of them), float64."""
    heads, kv_heads = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for s, (n, count) in enumerate(STEP):
        for i in range(count):
            pos = n - count + i
            first = 0 if window is None else max(0, pos - window + 1)
            slots = torch.tensor([int(tables[s, j // BLOCK]) * BLOCK + j % BLOCK for j in range(first, pos + 1)])
            keys = k[slots].double().repeat_interleave(heads // kv_heads, 1)  # (keys, heads, hd)
            values = v[slots].double().repeat_interleave(heads // kv_heads, 1)
            t = int(starts[s]) + i
            scores = torch.einsum("hd,jhd->hj", q[t].double(), keys) * scale
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            out[t] = torch.einsum("hj,jhd->hd", scores.softmax(-1), values)
    return out


@pytest.mark.parametrize("window,softcap", CASES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 32), (6, 2, 40), (8, 1, 64)])
def test_torch_path_equals_each_query_attending_alone(heads, kv_heads, head_dim, window, softcap):
    q, k, v, tables, lens, starts = make_step(heads, kv_heads, head_dim, free_outside=window or 0)
    expected = per_query(q, k, v, tables, lens, starts, 0.2, softcap, window)
    out = paged_attention_torch(q, k, v, tables, lens, starts, BLOCK, 0.2, softcap, window)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_the_dispatch_runs_the_torch_path_off_the_gpu():
    q, k, v, tables, lens, starts = make_step(4, 2, 32)
    ours = paged_attention(q, k, v, tables, lens, starts, 33, BLOCK, 0.2)
    assert torch.equal(ours, paged_attention_torch(q, k, v, tables, lens, starts, BLOCK, 0.2))


INTERPRETED = textwrap.dedent("""
    import json, sys, torch
    from leapllm.kernels.paged_attention_triton import paged_attention_triton
    from tests.kernels.test_paged_attention import BLOCK, CASES, STEP, make_step, per_query
    errors = []
    shapes = [(6, 2, 40, torch.float32), (8, 1, 64, torch.float16), (4, 4, 16, torch.float32)]
    for heads, kv_heads, head_dim, dtype in shapes:
        for window, softcap in CASES:
            q, k, v, tables, lens, starts = make_step(heads, kv_heads, head_dim, dtype, free_outside=window or 0)
            out = paged_attention_triton(q, k, v, tables, lens, starts, max(n for _, n in STEP), BLOCK, 0.2,
                                         softcap, window)
            assert out.dtype == dtype and out.shape == q.shape
            expected = per_query(q, k, v, tables, lens, starts, 0.2, softcap, window)
            errors.append([str(dtype), window, softcap, (out.double() - expected).abs().max().item()])
    print(json.dumps(errors))
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernel_in_the_interpreter_equals_each_query_attending_alone():
    # The interpreter must be chosen before Triton is imported: a process of its own.
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert run.returncode == 0, run.stderr[-3000:]
    import json
    for dtype, window, softcap, error in json.loads(run.stdout.strip().splitlines()[-1]):
        assert error < (2e-3 if dtype == "torch.float16" else 1e-5), (dtype, window, softcap, error)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,softcap", CASES)
def test_triton_kernel_on_the_gpu_equals_the_torch_path(dtype, window, softcap):
    from leapllm.kernels.paged_attention_triton import paged_attention_triton
    q, k, v, tables, lens, starts = (t.cuda() for t in make_step(8, 2, 128, dtype, free_outside=window or 0))
    out = paged_attention_triton(q, k, v, tables, lens, starts, max(n for _, n in STEP), BLOCK, 0.1, softcap, window)
    expected = per_query(q.cpu(), k.cpu(), v.cpu(), tables.cpu(), lens.cpu(), starts.cpu(), 0.1, softcap, window)
    assert (out.double().cpu() - expected).abs().max().item() < (1e-4 if dtype == torch.float32 else 3e-2)


ENGINE_IN_INTERPRETER = textwrap.dedent("""
    import json, sys
    import leapllm.engine.model_runner as model_runner
    import leapllm.kernels.paged_attention as paged_attention
    from leapllm.config import EngineConfig
    from leapllm.engine.llm_engine import LLMEngine
    from leapllm.engine.sampling import SamplingParams
    from leapllm.loading.loader import load_model
    from tests.engine_helpers import run_to_completion

    loaded = load_model(sys.argv[1], "float32", "cpu")
    prompts = [loaded.tokenizer.encode(text) for text in ("Once upon a time there was", "def add(a, b):", "1 2 3")]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    config = dict(max_num_seqs=4, max_num_batched_tokens=16, num_blocks=16, kv_cache_dtype="float32")
    groups = run_to_completion(LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(**config)), prompts, greedy)
    # The GPU's layout, its Triton kernel run by the interpreter: every step, prefill chunks included.
    import leapllm.kernels.paged_attention_triton as kernel
    model_runner.triton_supports = paged_attention.triton_supports = lambda *args: True
    calls, launch = [], kernel.paged_attention_triton
    kernel.paged_attention_triton = lambda *args: calls.append(args[6]) or launch(*args)  # max_query_len
    engine = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(**config))
    assert engine.runner.per_sequence and engine.runner.decode_graphs is not None
    tokens = run_to_completion(engine, prompts, greedy)
    assert max(calls) > 1 and 1 in calls  # prefill chunks and decode steps
    print(json.dumps([groups, tokens]))
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_engine_on_the_triton_kernel_in_the_interpreter_gives_the_decode_groups_tokens(tmp_path, hf_tokenizer):
    from tests.tiny_models import write_tiny_hf_folder

    folder = write_tiny_hf_folder(tmp_path / "llama", hf_tokenizer)
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", ENGINE_IN_INTERPRETER, str(folder)], capture_output=True, text=True,
                         env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))))
    assert run.returncode == 0, run.stderr[-3000:]
    import json
    groups, kernel = json.loads(run.stdout.strip().splitlines()[-1])
    assert kernel == groups and all(len(tokens) == 8 for tokens in kernel)
