"""engine/decode_graphs.py: decode steps from static, padded buffers (CUDA graphs on a GPU).

On the CPU nothing is captured, and DecodeGraphs runs the same buffers eagerly: what is checked
here is the bucketing, the padding rows (their keys go to the scratch block only) and that a padded
step gives the logits of the eager step. The CUDA-marked tests replay real graphs."""

from __future__ import annotations

import pytest
import torch

from leapllm.config import EngineConfig
from leapllm.engine.decode_graphs import DecodeGraphs, decode_buckets
from leapllm.engine.llm_engine import LLMEngine
from leapllm.engine.sampling import SamplingParams
from leapllm.loading.loader import load_model
from leapllm.model.paged_kv_cache import PagedKVCache, build_paged_batch
from tests.conftest import requires_cuda
from tests.engine_helpers import run_to_completion
from tests.model.prompts import PROMPTS
from tests.tiny_models import write_tiny_hf_folder

BS = 16
LENGTHS = [33, 20, 7]  # three sequences' prompts, longest first (decode groups want that order)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, hf_tokenizer):
    return write_tiny_hf_folder(tmp_path_factory.mktemp("graphs") / "llama", hf_tokenizer)


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return load_model(tiny_folder, "float32", "cpu")


def test_buckets_are_1_2_4_then_multiples_of_8_up_to_max_num_seqs():
    assert decode_buckets(1) == [1]
    assert decode_buckets(3) == [1, 2, 3]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]


def prefilled_cache(model, num_blocks: int) -> tuple[PagedKVCache, list[list[int]]]:
    """A pool holding the prompts of LENGTHS in shuffled blocks, and each sequence's table."""
    c = model.config
    cache = PagedKVCache(c.num_layers, num_blocks, BS, model.num_cached_kv_heads, c.head_dim, model.dtype, "cpu")
    order = [5, 0, 9, 2, 7, 1, 3, 8, 4, 6]
    tables = []
    for n in LENGTHS:
        tables.append([order.pop() for _ in range(-(-(n + 1) // BS))])
    g = torch.Generator().manual_seed(0)
    for table, n in zip(tables, LENGTHS):
        ids = torch.randint(0, c.vocab_size, (n,), generator=g)
        model.forward_paged(ids, cache, build_paged_batch([], [(table, 0, n)], BS, "cpu"), torch.tensor([n - 1]))
    return cache, tables


@torch.inference_mode()
def test_a_padded_step_gives_the_eager_logits_and_its_padding_writes_only_the_scratch_block(tiny):
    model = tiny.model
    eager_cache, tables = prefilled_cache(model, 10)
    cache, _ = prefilled_cache(model, 11)  # block 10: the scratch block
    before = [t.clone() for t in cache.k + cache.v]
    tokens = [11, 22, 33]
    decodes = [(table, n) for table, n in zip(tables, LENGTHS)]  # each writes its position n
    expected = model.forward_paged(torch.tensor(tokens), eager_cache, build_paged_batch(decodes, [], BS, "cpu"),
                                   torch.arange(3))
    graphs = DecodeGraphs(model, cache, BS, max_blocks=4, scratch_blocks=(10,), max_num_seqs=8, capture=False)
    logits = graphs.run([([table], n) for table, n in decodes], tokens)  # 3 sequences in the bucket of 4
    assert logits.shape == expected.shape and (logits - expected).abs().max().item() < 1e-4
    assert graphs.num_eager == 1 and graphs.num_replays == 0
    written = {table[n // BS] * BS + n % BS for table, n in decodes}
    for old, new, eager in zip(before, cache.k + cache.v, eager_cache.k + eager_cache.v):
        changed = {int(i) for i in (old != new).any(-1).any(-1).nonzero()}
        assert changed <= written | set(range(10 * BS, 11 * BS))  # the step's slots and the scratch block
        assert changed & set(range(10 * BS, 11 * BS))  # the padding row did write there
        assert torch.allclose(new[:10 * BS].float(), eager.float(), atol=1e-3)


def test_steps_that_do_not_fit_the_buffers_are_left_to_the_eager_path(tiny):
    model = tiny.model
    cache, _ = prefilled_cache(model, 11)
    graphs = DecodeGraphs(model, cache, BS, max_blocks=4, scratch_blocks=(10,), max_num_seqs=8, capture=False)
    assert graphs.fits(8, [[[1, 2, 3, 4]]] * 8)
    assert not graphs.fits(9, [[[1]]] * 9)  # more sequences than the largest bucket
    assert not graphs.fits(1, [[[1, 2, 3, 4, 5]]])  # a table wider than the buffers


def test_enforce_eager_is_a_flag_of_the_engine_config():
    import argparse

    from leapllm.cli.args import add_engine_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert not engine_config_from_args(p.parse_args([])).enforce_eager
    assert engine_config_from_args(p.parse_args(["--enforce-eager"])).enforce_eager


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@requires_cuda
@pytest.mark.cuda
def test_replayed_graphs_give_the_eager_engines_tokens_in_float32(tiny_folder):
    loaded = load_model(tiny_folder, "float32", "cuda")
    prompts = [loaded.tokenizer.encode(PROMPTS[name]) for name in ("english", "code", "emoji", "math", "french")]
    config = dict(max_num_seqs=8, num_blocks=64)
    eager = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(**config, enforce_eager=True))
    assert eager.runner.per_sequence and eager.runner.decode_graphs is None
    graphed = LLMEngine(loaded.model, loaded.tokenizer, EngineConfig(**config))
    graphs = graphed.runner.decode_graphs
    assert sorted(graphs.graphs) == graphs.buckets == [1, 2, 4, 8]
    assert run_to_completion(graphed, prompts, GREEDY) == run_to_completion(eager, prompts, GREEDY)
    assert graphs.num_replays > 0 and graphs.num_eager == 0
