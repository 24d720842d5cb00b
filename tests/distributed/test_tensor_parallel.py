"""Tensor parallelism: the shards add up to the model, TP=2 on CPU (gloo, two processes) generates
exactly what TP=1 does, and a rank that dies ends things with a clear message instead of a hang.

The shard arithmetic is checked on small random models whose sizes divide badly (heads, kv heads,
MLP width and vocabulary that do not split evenly, q/k/v biases), with every rank a thread of this
process: fast, and it covers shapes the default model does not. The real thing, two processes on
the default model, runs through LLM(tensor_parallel=2) and `leapllm serve --tensor-parallel 2`.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import threading
import time

import openai
import pytest
import torch
import torch.distributed as dist

from leapllm import LLM, SamplingParams
from leapllm.config import EngineConfig, available_cpus
from leapllm.distributed import TensorParallelError
from leapllm.distributed.communicator import Communicator
from leapllm.distributed.runtime import (
    batch_from_message,
    batch_message,
    threads_per_rank,
)
from leapllm.distributed.tensor_parallel import (
    check_tensor_parallel,
    shard_heads,
    shard_model,
)
from leapllm.errors import InvalidRequestError
from leapllm.model.config import ModelConfig
from leapllm.model.kv_cache import KVCache
from leapllm.model.llama import Transformer
from leapllm.model.paged_kv_cache import PagedKVCache, build_paged_batch
from tests.cli_helpers import assert_one_line_error
from tests.serving.test_serve_cli import ServeProcess

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "List three colors:",
    # Long enough to be prefilled in several chunks (max_num_batched_tokens=64 below).
    ("Write a detailed essay about the history of the printing press, its inventors, how it spread across "
     "Europe, what it changed for science, religion and politics, and why historians still argue about "
     "its effects on literacy. ") * 2,
    # Shares a long prefix with the previous prompt: served partly from the prefix cache.
    ("Write a detailed essay about the history of the printing press, its inventors, how it spread across "
     "Europe, what it changed for science, religion and politics, and why historians still argue about "
     "its effects on literacy. In one sentence:"),
]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


# -- which heads a rank owns ------------------------------------------------------------------------

@pytest.mark.parametrize("heads, kv_heads, world, expected", [
    # SmolLM2-135M over 2 ranks: 9 query heads as 5 + 4; kv heads duplicated where a rank's query
    # heads cover them unevenly, so each local kv head serves one query head.
    (9, 3, 2, [(range(5), [0, 0, 0, 1, 1]), (range(5, 9), [1, 2, 2, 2])]),
    # ... and over 3 ranks: one whole group each, nothing duplicated.
    (9, 3, 3, [(range(3), [0]), (range(3, 6), [1]), (range(6, 9), [2])]),
    # More ranks than kv heads: each rank's query heads share one (replicated) kv head.
    (8, 2, 4, [(range(2), [0]), (range(2, 4), [0]), (range(4, 6), [1]), (range(6, 8), [1])]),
    # Two whole groups per rank; and a split inside groups that still keeps grouped attention.
    (32, 8, 2, [(range(16), [0, 1, 2, 3]), (range(16, 32), [4, 5, 6, 7])]),
    (12, 2, 2, [(range(6), [0]), (range(6, 12), [1])]),
    (12, 3, 2, [(range(6), [0, 0, 1]), (range(6, 12), [1, 2, 2])]),  # groups of 4: runs of 4+2 and 2+4
])
def test_heads_split_evenly_and_kv_heads_follow_their_query_heads(heads, kv_heads, world, expected):
    got = [shard_heads(heads, kv_heads, rank, world) for rank in range(world)]
    assert [(s.q_heads, s.kv_heads) for s in got] == expected


# -- the shards add up to the full model (ranks as threads) -----------------------------------------

def tiny_model(**overrides) -> Transformer:
    fields = {"architecture": "qwen2", "vocab_size": 101, "hidden_size": 48, "intermediate_size": 70,
              "num_layers": 2, "num_heads": 6, "num_kv_heads": 3, "head_dim": 8, "context_length": 128,
              "attention_bias": True, "tie_word_embeddings": True}
    fields.update(overrides)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**fields)).eval()
    with torch.no_grad():  # RMSNorm weights start at one; make them matter
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def run_on_ranks(model: Transformer, world: int, step) -> list:
    """step(shard, rank) on every rank's shard at once, each rank a thread with its own gloo groups."""
    store = dist.HashStore()
    results, errors = [None] * world, []

    def rank_main(rank):
        try:
            comm = Communicator(store, rank, world, torch.device("cpu"), hostname="127.0.0.1")
            shard = shard_model(copy.deepcopy(model), rank, world, comm)
            with torch.inference_mode():
                results[rank] = step(shard, rank)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def contiguous_pass(model: Transformer, kv_heads: int) -> list[torch.Tensor]:
    """Prefill 2 sequences of 7 tokens, then 3 decode steps, with the contiguous KV cache."""
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    c = model.config
    cache = KVCache(c.num_layers, 2, kv_heads, 16, c.head_dim, model.dtype, "cpu")
    outs = [model(tokens[:, :7], 0, cache)]
    for pos in range(7, 10):
        outs.append(model(tokens[:, pos:pos + 1], pos, cache, last_only=True))
    return outs


def paged_pass(model: Transformer, kv_heads: int) -> list[torch.Tensor]:
    """Two serving steps: a whole prompt and a first chunk; then a decode and the second chunk."""
    c = model.config
    cache = PagedKVCache(c.num_layers, 8, 4, kv_heads, c.head_dim, model.dtype, "cpu")
    # Every rank (a thread) must see the same tokens: a generator of its own, not the global one. a's 7th
    # token is drawn, not sampled from the logits: only rank 0 sees full logits (the engine sends tokens on).
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, c.vocab_size, (7,), generator=g).tolist()
    b = torch.randint(0, c.vocab_size, (9,), generator=g).tolist()
    table_a, table_b = [0, 1], [2, 3, 4]
    batch = build_paged_batch([], [(table_a, 0, 6), (table_b, 0, 5)], 4, torch.device("cpu"))
    first = model.forward_paged(torch.tensor(a[:6] + b[:5]), cache, batch, torch.tensor([5, 10]))
    batch = build_paged_batch([(table_a, 6)], [(table_b, 5, 4)], 4, torch.device("cpu"))
    second = model.forward_paged(torch.tensor(a[6:] + b[5:]), cache, batch, torch.tensor([0, 2, 4]))
    return [first, second]


@pytest.mark.parametrize("overrides, world", [
    ({}, 2),  # 6 heads / 3 kv heads over 2: kv heads duplicated; vocab 101 and MLP 70 split unevenly
    ({}, 4),  # 6 heads over 4 ranks: 2, 2, 1, 1 query heads
    ({"num_heads": 4, "num_kv_heads": 4, "architecture": "llama", "attention_bias": False,
      "tie_word_embeddings": False}, 3),  # plain multi-head attention, untied head
])
def test_shards_add_up_to_the_full_model(overrides, world):
    model = tiny_model(**overrides)
    full_kv = model.config.num_kv_heads
    with torch.inference_mode():
        want_contiguous = contiguous_pass(model, full_kv)
        want_paged = paged_pass(model, full_kv)

    def step(shard, rank):
        kv = shard.layers[0].attn.num_kv_heads
        return contiguous_pass(shard, kv), paged_pass(shard, kv)

    got_contiguous, got_paged = run_on_ranks(model, world, step)[0]  # rank 0 holds the gathered logits
    for got, want in zip(got_contiguous + got_paged, want_contiguous + want_paged):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_paged_batch_is_rebuilt_exactly_from_block_tables_and_lengths():
    decodes = [([7, 3, 9], 40), ([2, 5], 30), ([4], 3), ([8], 2)]  # longest first: two length groups
    # fresh, cached prefix, one token, a verification chunk
    prefills = [([1, 6], 0, 5), ([10, 11, 12], 17, 14), ([0, 13], 16, 1), ([14, 15], 20, 3, True)]
    batch = build_paged_batch(decodes, prefills, 16, torch.device("cpu"))
    header, tensors = batch_message(batch, 16)
    # What travels is per block, not per position: far smaller than the slot tables.
    assert sum(t.numel() for t in tensors) < sum(t.numel() for t in [g.slots for g in batch.decode_groups])
    rebuilt = batch_from_message(json.loads(json.dumps(header)), tensors, 16)
    assert rebuilt.num_decode == batch.num_decode
    for name in ("slot_mapping", "positions"):
        assert torch.equal(getattr(rebuilt, name), getattr(batch, name))
    assert len(rebuilt.decode_groups) == len(batch.decode_groups) == 2
    assert_same_batch(rebuilt, batch)


def assert_same_batch(got_batch, want_batch):
    def same(a, b):
        return (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))

    for name in ("slot_mapping", "positions"):
        assert same(getattr(got_batch, name), getattr(want_batch, name))
    for got, want in zip(got_batch.decode_groups, want_batch.decode_groups, strict=True):
        assert (got.start, got.end) == (want.start, want.end)
        assert same(got.slots, want.slots) and same(got.mask, want.mask) and same(got.lengths, want.lengths)
        assert all(same(a, b) for a, b in zip(got.window_view(8), want.window_view(8)))
    for got, want in zip(got_batch.prefills, want_batch.prefills, strict=True):
        assert (got.start, got.end, got.first, got.verify) == (want.start, want.end, want.first, want.verify)
        assert same(got.slots, want.slots)
        for window in (None, 8):
            assert same(got.mask_for(window, "cpu"), want.mask_for(window, "cpu"))


def test_a_batch_described_per_sequence_travels_as_its_tables():
    # The GPU's layout (attention in place): the block tables, lengths and starts are the message.
    decodes = [([7, 3, 9], 40), ([4], 3)]
    prefills = [([1, 6], 0, 5), ([14, 15], 20, 3, True)]
    batch = build_paged_batch(decodes, prefills, 16, torch.device("cpu"), per_sequence=True)
    assert batch.tables.max_query_len == 5 and batch.tables.query_start.tolist() == [0, 1, 2, 7, 10]
    assert batch.tables.block_tables.tolist() == [[7, 3, 9], [4, -1, -1], [1, 6, -1], [14, 15, -1]]
    header, tensors = batch_message(batch, 16)
    rebuilt = batch_from_message(json.loads(json.dumps(header)), tensors, 16)
    assert_same_batch(rebuilt, batch)
    assert rebuilt.tables.max_query_len == 5
    for name in ("block_tables", "seq_lens", "query_start"):
        assert torch.equal(getattr(rebuilt.tables, name), getattr(batch.tables, name))


def test_the_windowed_layers_batch_travels_with_the_full_layers_one():
    # A model that mixes windowed and full layers: the same step on each sequence's second block
    # table, whose blocks before the window were freed (-1).
    full = build_paged_batch([([7, 3, 9], 40)], [([10, 11, 12], 17, 14)], 16, torch.device("cpu"))
    full.windowed = build_paged_batch([([-1, 5, 6], 40)], [([-1, 2, 4], 17, 14)], 16, torch.device("cpu"))
    header, tensors = batch_message(full, 16)
    rebuilt = batch_from_message(json.loads(json.dumps(header)), tensors, 16)
    assert_same_batch(rebuilt, full)
    assert_same_batch(rebuilt.windowed, full.windowed)
    plain = batch_from_message(*batch_message(build_paged_batch([([4], 3)], [], 16, torch.device("cpu")), 16), 16)
    assert plain.windowed is None


def test_a_rank_without_heads_is_a_clear_error():
    with pytest.raises(InvalidRequestError, match="cannot split 6 attention heads over 7 ranks"):
        check_tensor_parallel(tiny_model(), 7)


# -- two processes on the default model --------------------------------------------------------------

def tp1_outputs(llm, prompts, params):
    return [o.token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def tp2():
    """The default model over 2 processes; small steps, so the long prompts are prefilled in chunks."""
    llm = LLM(dtype="float32", device="cpu", tensor_parallel=2,
              engine_config=EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, num_blocks=256))
    yield llm
    llm.close()


@pytest.mark.slow
def test_tp2_generates_exactly_what_tp1_does_for_concurrent_prompts(tp2, llm):
    want = tp1_outputs(llm, PROMPTS, GREEDY)
    got = [o.token_ids for o in tp2.generate(PROMPTS, GREEDY)]
    assert got == want
    assert tp2.engine.allocator.prefix_hits > 0  # the shared prefix came from the cache on every rank
    # The engine is reused: a second batch on the same KV pools still matches.
    assert [o.token_ids for o in tp2.generate(PROMPTS[:3], GREEDY)] == want[:3]


def test_ranks_on_one_machine_share_its_cores_unless_told():
    cores = len(available_cpus())
    assert threads_per_rank(None, 2) == max(1, cores // 2)
    assert threads_per_rank(None, 4 * cores) == 1  # never none
    assert threads_per_rank(3, 2) == 3


@pytest.mark.slow
def test_every_rank_runs_on_its_share_of_the_cores(tp2):
    # Two ranks with every core each would make them wait on each other at every barrier.
    share = threads_per_rank(None, 2)
    assert tp2.engine.cpu_threads.max_threads == share  # rank 0, this process: its steps use at most its share
    (worker,) = tp2.model.group.workers
    argv = open(f"/proc/{worker.pid}/cmdline", "rb").read().split(b"\0")
    assert argv[argv.index(b"--threads") + 1] == str(share).encode()


@pytest.mark.slow
def test_tp2_single_stream_generation_matches_tp1(tp2, llm):
    for prompt in PROMPTS[:2]:
        want = llm.run(llm.encode(prompt), GREEDY).token_ids
        assert tp2.run(tp2.encode(prompt), GREEDY).token_ids == want


@pytest.mark.slow
def test_a_dead_rank_fails_the_next_call_at_once_and_names_the_rank():
    llm = LLM(dtype="float32", device="cpu", tensor_parallel=2)
    try:
        worker = llm.model.group.workers[0]
        assert llm.generate("Hi", SamplingParams(max_tokens=2, temperature=0))[0].token_ids
        worker.kill()
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"tensor-parallel rank 1 \(pid \d+\) was killed by SIGKILL"):
            llm.generate(["Hello there", "Once"], SamplingParams(max_tokens=8, temperature=0))
        assert time.monotonic() - start < 10
        with pytest.raises(TensorParallelError, match="rank 1"):  # and every later call, without waiting
            llm.generate("Hi", SamplingParams(max_tokens=2))
    finally:
        llm.close()


def test_tensor_parallel_must_be_a_positive_integer():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(InvalidRequestError, match="tensor_parallel must be a positive integer"):
            LLM(tensor_parallel=bad)


@pytest.mark.parametrize("argv, pattern", [
    (["--tensor-parallel", "0"], "--tensor-parallel must be at least 1, got 0"),
    (["--tensor-parallel", "-3"], "--tensor-parallel must be at least 1, got -3"),
    (["--replicas", "2", "--tensor-parallel", "2"], "--replicas and --tensor-parallel cannot be combined"),
])
def test_bad_tensor_parallel_settings_are_one_line_and_exit_2(capsys, argv, pattern):
    assert_one_line_error(capsys, ["serve", "--port", "0", *argv], pattern)


# -- leapllm serve --tensor-parallel 2 ---------------------------------------------------------------

def child_pids(pid: int) -> list[int]:
    """Processes whose parent is pid (Linux /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_serve_tensor_parallel_2_matches_tp1_and_a_dead_rank_stops_the_server(llm):
    # The reference first: nothing in this process competes with the two ranks for the cores later.
    want = llm.generate(PROMPTS[1], GREEDY)[0].text
    server = ServeProcess("--tensor-parallel", "2", "--dtype", "float32", "--device", "cpu", "--kv-cache-gb", "0.05",
                          "--served-model-name", "smollm2", "--shutdown-timeout", "5")
    try:
        url = server.wait_healthy()
        assert any("tensor-parallel over 2 ranks" in line for line in server.stderr)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.completions.create(model="smollm2", prompt=PROMPTS[1], max_tokens=24, temperature=0)
        assert reply.choices[0].text == want

        (worker,) = child_pids(server.proc.pid)
        stream = client.completions.create(model="smollm2", prompt="Tell me a long story.", max_tokens=500,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        start = None
        with pytest.raises(openai.APIError, match="tensor-parallel rank 1"):
            for i, _ in enumerate(stream):
                if i == 2:
                    os.kill(worker, signal.SIGKILL)
                    start = time.monotonic()
        assert time.monotonic() - start < 30  # the request failed promptly instead of hanging
        assert server.proc.wait(60) == 1
        server.ready.wait(10)
        err = "".join(server.stderr)
        assert f"leapllm: error: tensor-parallel rank 1 (pid {worker}) was killed by SIGKILL; the server stopped" in err
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
