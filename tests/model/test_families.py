"""Every supported family against transformers' own modeling code, on random 3-layer models with the
family's real switches (tests/tiny_models.FAMILY_CONFIGS), saved by transformers itself.

The prompts outrun the windowed families' windows (8-16 keys), so windowed attention is exercised in
the full forward, in cached decode, in chunked prefill and in the paged engine.
"""

from __future__ import annotations

import pytest
import torch

from leapllm.config import EngineConfig, SpeculativeConfig
from leapllm.engine.llm_engine import LLMEngine
from leapllm.engine.sampling import SamplingParams
from leapllm.loading.loader import load_model
from tests.engine_helpers import generate_one, output_tokens, run_to_completion
from tests.model.hf_reference import hf_greedy
from tests.model.prompts import PROMPTS
from tests.tiny_models import FAMILY_CONFIGS, write_family_folder, write_family_gguf

FAMILIES = list(FAMILY_CONFIGS)
PROMPT_NAMES = ["english", "chat", "chinese", "code", "emoji", "math", "french"]
GREEDY_TOKENS = 32
GREEDY = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory, hf_tokenizer):
    root = tmp_path_factory.mktemp("families")
    return {family: write_family_folder(root / family, hf_tokenizer, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def loaded(family_folders):
    """(leapllm's model, transformers' model) per family, loaded once."""
    import transformers

    pairs = {}
    for family, folder in family_folders.items():
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        pairs[family] = (load_model(folder, "float32", "cpu"), ref)
    return pairs


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_float32_logits_match_transformers_on_prompts_longer_than_the_window(loaded, family):
    ours, ref = loaded[family]
    assert ours.config.architecture == family
    window = ours.config.sliding_window
    lengths = []
    for name in PROMPT_NAMES:
        ids = ours.tokenizer.encode(PROMPTS[name])
        lengths.append(len(ids))
        diff = (ours.model(torch.tensor([ids])) - ref(torch.tensor([ids])).logits).abs().max().item()
        assert diff < 1e-4, (name, diff)
    if window is not None:
        assert max(lengths) > 2 * window


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_32_greedy_tokens_match_transformers_through_the_single_sequence_engine(loaded, family):
    ours, ref = loaded[family]
    for name in ("english", "code"):
        ids = ours.tokenizer.encode(PROMPTS[name])
        outputs, _ = generate_one(ours.model, ours.tokenizer, ids, GREEDY)
        assert output_tokens(outputs) == hf_greedy(ref, ids, GREEDY_TOKENS), name


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_engine_with_preemption_chunked_prefill_and_prefix_hits_gives_the_same_tokens(loaded, family):
    ours, _ = loaded[family]
    names = ["english", "code", "emoji", "math"]
    prompts = [ours.tokenizer.encode(PROMPTS[n]) for n in names]
    alone = [output_tokens(generate_one(ours.model, ours.tokenizer, ids, GREEDY)[0]) for ids in prompts]
    # 8 blocks of 16 tokens cannot hold four ~50-token sequences (5 cannot hold four windows of 8-16
    # keys, where every layer is windowed and out-of-window blocks are freed): someone is preempted;
    # chunks of 16 tokens split every prompt.
    tight = LLMEngine(ours.model, ours.tokenizer, EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=16, num_blocks=5 if ours.config.kv_window else 8,
        enable_prefix_caching=False))
    assert run_to_completion(tight, prompts, GREEDY) == alone
    assert tight.scheduler.num_preemptions > 0
    # The same prompts again after a first pass: their full blocks come from the prefix cache.
    cached = LLMEngine(ours.model, ours.tokenizer, EngineConfig(max_num_seqs=4, num_blocks=64))
    assert run_to_completion(cached, prompts, GREEDY) == alone
    assert run_to_completion(cached, prompts, GREEDY) == alone
    assert cached.allocator.prefix_hits > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_described_per_sequence_and_static_decode_buffers_give_the_same_tokens(loaded, family, monkeypatch):
    """The GPU's step layout (engine/model_runner.step_layout) run on the CPU: attention from sequence
    tables (the PyTorch path of kernels/paged_attention.py) and decode steps from DecodeGraphs' static,
    padded buffers (not captured off the GPU), with preemption, chunked prefill and prefix hits."""
    import leapllm.engine.model_runner as model_runner

    ours, _ = loaded[family]
    monkeypatch.setattr(model_runner, "triton_supports", lambda *args: True)
    if ours.model.rope_threshold is not None:  # LongRoPE and dynamic NTK keep the decode groups and chunks
        assert not LLMEngine(ours.model, ours.tokenizer, EngineConfig(num_blocks=8)).runner.per_sequence
        return
    names = ["english", "code", "emoji"]
    prompts = [ours.tokenizer.encode(PROMPTS[n]) for n in names]
    with monkeypatch.context() as eager:
        eager.setattr(model_runner, "triton_supports", lambda *args: False)
        alone = [output_tokens(generate_one(ours.model, ours.tokenizer, ids, GREEDY)[0]) for ids in prompts]
    tight = LLMEngine(ours.model, ours.tokenizer, EngineConfig(
        max_num_seqs=3, max_num_batched_tokens=16, num_blocks=5 if ours.config.kv_window else 8))
    graphs = tight.runner.decode_graphs
    assert tight.runner.per_sequence and (graphs is None) == bool(ours.config.num_experts)
    assert run_to_completion(tight, prompts, GREEDY) == alone
    assert tight.scheduler.num_preemptions > 0
    if graphs is not None:
        assert graphs.buckets == [1, 2, 3] and graphs.num_eager > 0 and not graphs.graphs
    # LLM.run's engine takes the paged layout where graphs run (the contiguous one is the CPU's).
    outputs, engine = generate_one(ours.model, ours.tokenizer, prompts[0], GREEDY)
    assert output_tokens(outputs) == alone[0] and engine.runner.single_sequence == (graphs is None)


def test_the_windows_change_the_answer_so_the_tests_above_check_them(loaded):
    ours, _ = loaded["mistral"]
    ids = torch.tensor([ours.tokenizer.encode(PROMPTS["emoji"])])
    with torch.inference_mode():
        windowed = ours.model(ids)
        layers = ours.model.layers
        saved = [layer.attn.core.window for layer in layers]
        try:
            for layer in layers:
                layer.attn.core.window = None
            unwindowed = ours.model(ids)
        finally:
            for layer, window in zip(layers, saved):
                layer.attn.core.window = window
    assert (windowed - unwindowed).abs().max().item() > 1e-2


@pytest.fixture(scope="module")
def family_ggufs(family_folders, tmp_path_factory, default_gguf_path):
    """Each family folder as llama.cpp's converter writes it, float32 (tiny_models.write_family_gguf)."""
    root = tmp_path_factory.mktemp("family-gguf")
    return {f: write_family_gguf(folder, root / f"{f}.gguf", default_gguf_path) for f, folder in family_folders.items()}


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_gguf_of_each_family_gives_the_folders_logits(loaded, family_ggufs, family):
    ours, _ = loaded[family]
    from_gguf = load_model(family_ggufs[family], "float32", "cpu")
    assert from_gguf.config.architecture == ("llama" if family in ("mistral", "mixtral") else family)
    for name in ("english", "chinese", "code"):
        ids = ours.tokenizer.encode(PROMPTS[name])
        assert from_gguf.tokenizer.encode(PROMPTS[name]) == ids
        if family == "mistral":
            # llama.cpp's converter writes Mistral as "llama" without its window: equal while the window does not bind.
            assert from_gguf.config.sliding_window is None
            ids = ids[:ours.config.sliding_window]
        diff = (from_gguf.model(torch.tensor([ids])) - ours.model(torch.tensor([ids]))).abs().max().item()
        assert diff < 1e-4, (name, diff)


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_gguf_of_each_family_runs_as_stored_and_agrees_between_engines(family_folders, tmp_path,
                                                                                default_gguf_path, loaded, family):
    from gguf import GGMLQuantizationType

    from leapllm.kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("leapllm's CPU kernels are not built here")
    path = write_family_gguf(family_folders[family], tmp_path / "q8.gguf", default_gguf_path, GGMLQuantizationType.Q8_0)
    quantized = load_model(path, "auto", "cpu")
    assert "leapllm int8 kernels" in quantized.config.extra["kernels_by_type"]["Q8_0"]
    ours, _ = loaded[family]
    ids = ours.tokenizer.encode(PROMPTS["code"])
    if family == "mistral":
        ids = ids[:ours.config.sliding_window]
    with torch.inference_mode():
        a, b = quantized.model(torch.tensor([ids])), ours.model(torch.tensor([ids]))
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.8
    # Prompts of 12 tokens, and one sequence at a time in steps of at most 16 tokens: row counts whose
    # packed-kernel results are bit-identical to one row's (a longer prefill takes the many-row path,
    # equal only to rounding), so the paged engine must give the very same tokens.
    prompts = [ours.tokenizer.encode(PROMPTS[n])[:12] for n in ("english", "math")]
    alone = [output_tokens(generate_one(quantized.model, quantized.tokenizer, p, GREEDY)[0]) for p in prompts]
    engine = LLMEngine(quantized.model, quantized.tokenizer, EngineConfig(max_num_seqs=1, max_num_batched_tokens=16,
                                                                          num_blocks=32))
    assert run_to_completion(engine, prompts, GREEDY) == alone
    # Batched, the attention sums keys in another order: random tiny models have near-tied logits, so
    # only the first tokens are pinned.
    batched = LLMEngine(quantized.model, quantized.tokenizer, EngineConfig(max_num_seqs=2, num_blocks=32))
    assert [t[:8] for t in run_to_completion(batched, prompts, GREEDY)] == [t[:8] for t in alone]


MOE_FAMILIES = [f for f in FAMILIES if FAMILY_CONFIGS[f][2].get("num_experts_per_tok")]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_decode_token_runs_only_its_k_experts_and_the_cost_model_reads_only_those(loaded, family):
    from leapllm.profiling.costs import step_costs

    ours, _ = loaded[family]
    c = ours.config
    calls: list[int] = []
    hooks = [expert.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
             for layer in ours.model.layers if c.is_moe_layer(layer.attn.core.layer_idx)
             for expert in layer.mlp.experts]
    try:
        with torch.inference_mode():
            cache = ours.model.new_kv_cache(1, 16)
            ours.model(torch.tensor([ours.tokenizer.encode("Hello there")]), 0, cache)
            calls.clear()
            ours.model(torch.tensor([[42]]), 2, cache)  # one decode token
    finally:
        for hook in hooks:
            hook.remove()
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_layers))
    assert len(calls) == moe_layers * c.num_experts_per_token and set(calls) == {1}

    # Bytes per decode token: the shared weights plus k experts per MoE layer, not all experts.
    h, width = c.hidden_size, c.expert_intermediate_size
    expert_bytes = 3 * h * width * 4
    decode = step_costs(c, 1, 1, 8, 4)
    mlp_bytes = decode["gate_up_proj"].weight_bytes + decode["down_proj"].weight_bytes
    dense = c.num_layers - moe_layers
    shared = 3 * h * c.shared_expert_intermediate_size * 4 + h * 4 if c.shared_expert_intermediate_size else 0
    per_moe_layer = c.num_experts_per_token * expert_bytes + shared + c.num_experts * h * 4
    assert mlp_bytes == moe_layers * per_moe_layer + dense * 3 * h * c.intermediate_size * 4
    prefill = step_costs(c, 1, 64, 0, 4)  # 64 tokens x k choices reach every expert
    assert prefill["down_proj"].weight_bytes >= moe_layers * c.num_experts * h * width * 4


@pytest.mark.parametrize("family", ["gemma3", "qwen3moe"])
def test_the_server_answers_with_the_engines_greedy_tokens(loaded, family):
    import httpx

    from leapllm.engine.async_engine import AsyncEngine
    from leapllm.serving import create_app
    from leapllm.serving.runner import ServerThread

    ours, _ = loaded[family]
    prompt = PROMPTS["english"]
    expected = output_tokens(generate_one(ours.model, ours.tokenizer, ours.tokenizer.encode(prompt), GREEDY)[0])
    engine = AsyncEngine(LLMEngine(ours.model, ours.tokenizer, EngineConfig(max_num_seqs=4, num_blocks=64)))
    app = create_app(engine, ours.tokenizer, family, ours.config.context_length)
    with ServerThread(app) as server:
        body = {"model": family, "prompt": prompt, "max_tokens": GREEDY_TOKENS, "temperature": 0,
                "ignore_eos": True}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["text"] == ours.tokenizer.decode(expected)


def test_a_windowed_sequence_holds_a_bounded_number_of_blocks_as_it_grows(loaded):
    ours, _ = loaded["mistral"]  # every layer windowed: 8 keys
    window, bs = ours.config.sliding_window, 4
    ids = ours.tokenizer.encode(PROMPTS["english"])
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    alone = output_tokens(generate_one(ours.model, ours.tokenizer, ids, params)[0])
    engine = LLMEngine(ours.model, ours.tokenizer, EngineConfig(block_size=bs, num_blocks=16, max_num_seqs=1))
    assert [g.window for g in engine.scheduler.groups] == [window]
    engine.add_request("0", ids, params)
    tokens, held = [], []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
        held.append(engine.allocator.num_used)
    assert tokens == alone
    # 14 prompt tokens + 48 would need 16 blocks of 4; a decode step's query sees only the last 8 keys.
    assert len(ids) + 48 > 15 * bs and max(held[1:]) <= -(-window // bs) + 1
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_a_mixed_window_model_frees_only_its_windowed_layers_blocks_as_a_sequence_grows(loaded):
    ours, _ = loaded["gemma3"]  # 5 windowed layers of 8 keys, 1 full layer
    window, bs = ours.config.sliding_window, 4
    ids = ours.tokenizer.encode(PROMPTS["english"])
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    alone = output_tokens(generate_one(ours.model, ours.tokenizer, ids, params)[0])
    engine = LLMEngine(ours.model, ours.tokenizer, EngineConfig(block_size=bs, num_blocks=32, max_num_seqs=1))
    full, windowed = engine.scheduler.groups
    assert (full.window, windowed.window) == (None, window)
    cache = engine.runner.cache
    assert cache.windowed_layers == set(ours.config.windowed_layers) == {0, 1, 2, 3, 4}
    engine.add_request("0", ids, params)
    tokens, held = [], []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
        held.append((full.allocator.num_used, windowed.allocator.num_used))
    assert tokens == alone
    # The full layer keeps every position; the windowed ones a window and the block being filled.
    assert max(f for f, _ in held) == -(-(len(ids) + 47) // bs)
    assert max(w for _, w in held[1:]) <= -(-window // bs) + 1
    assert full.allocator.num_free == full.allocator.num_blocks
    assert windowed.allocator.num_free == windowed.allocator.num_blocks
    stats = engine.stats()  # what the server's dashboard charts
    assert (stats["kv_blocks_total"], stats["kv_window_blocks_total"]) == (32, windowed.allocator.num_blocks)


def test_a_mixed_window_model_gives_its_full_layers_the_memory_its_windowed_layers_cannot_use(loaded):
    ours, _ = loaded["gemma3"]
    config = EngineConfig(kv_cache_gb=0.01, block_size=4, max_num_seqs=2, max_num_batched_tokens=16)
    engine = LLMEngine(ours.model, ours.tokenizer, config)
    full, windowed = (g.allocator.num_blocks for g in engine.scheduler.groups)
    # Two sequences each see a window of 8 keys plus at most a step's 16 new ones.
    assert windowed == 2 * (8 // 4 + 2) + 16 // 4
    cache = engine.runner.cache
    assert cache.k[0].shape[0] == windowed * 4 and cache.k[5].shape[0] == full * 4
    per_layer_block = cache.k[5][:4].nbytes * 2
    assert cache.nbytes() <= 0.01 * 2**30 < (full + 1) * per_layer_block + 5 * windowed * per_layer_block
    assert full > 5 * (0.01 * 2**30 // (6 * per_layer_block))  # 6 equal pools would give each this many


def test_a_mixed_window_model_hits_the_prefix_cache_after_its_early_windowed_blocks_are_gone(loaded):
    ours, _ = loaded["gemma3"]
    prompt = ours.tokenizer.encode(PROMPTS["english"] + " " + PROMPTS["code"])
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    # One sequence, 16-token steps: the windowed pool has 8 blocks of 4, fewer than the prompt needs.
    engine = LLMEngine(ours.model, ours.tokenizer, EngineConfig(block_size=4, num_blocks=64, max_num_seqs=1,
                                                                max_num_batched_tokens=16))
    full, windowed = engine.scheduler.groups
    assert windowed.allocator.num_blocks == 8 < len(prompt) // 4
    first = run_to_completion(engine, [prompt], params)
    engine.add_request("again", prompt + [7], params)  # a longer prompt: served up to its last full block
    tokens, cached = [], 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            cached = out.num_cached_tokens
    assert cached >= len(prompt) // 4 * 4 - 4 and first
    alone = output_tokens(generate_one(ours.model, ours.tokenizer, prompt + [7], params)[0])
    assert tokens == alone


def test_info_names_what_each_family_does_beyond_llama(family_folders):
    from leapllm import LLM

    gemma3 = LLM(str(family_folders["gemma3"]), dtype="float32", device="cpu").info()["family"]
    assert gemma3["sliding window"] == "8 keys in 5 of 6 layers" and gemma3["q/k norm"] == "per head"
    assert gemma3["norms"] == "before and after attention and MLP" and gemma3["local rope base"] == "10000"
    moe = LLM(str(family_folders["qwen2moe"]), dtype="float32", device="cpu").info()["family"]
    assert moe["experts"] == "8, 2 per token, in 2 of 3 layers, a shared expert"
    assert LLM(dtype="float32", device="cpu").info()["family"] == {}  # the default model is a Llama


@torch.inference_mode()
def test_yarn_rope_matches_transformers_from_the_folder_and_its_gguf(tmp_path, hf_tokenizer, default_gguf_path):
    import transformers

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0}
    folder = write_family_folder(tmp_path / "yarn", hf_tokenizer, "qwen3", rope_parameters=yarn)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_model(folder, "float32", "cpu")
    from_gguf = load_model(write_family_gguf(folder, tmp_path / "yarn.gguf", default_gguf_path), "float32", "cpu")
    assert ours.config.rope_scaling["type"] == from_gguf.config.rope_scaling["type"] == "yarn"
    ids = ours.tokenizer.encode(PROMPTS["emoji"] + " " + PROMPTS["code"])
    expected = ref(torch.tensor([ids])).logits
    for model in (ours, from_gguf):
        assert (model.model(torch.tensor([ids])) - expected).abs().max().item() < 1e-4
    plain = load_model(write_family_folder(tmp_path / "plain", hf_tokenizer, "qwen3"), "float32", "cpu")
    assert (plain.model(torch.tensor([ids])) - expected).abs().max().item() > 1e-2  # YaRN changed the answer


def assert_speculation_changes_nothing(ours, ids, params, expected):
    """n-gram speculation (every proposal verified, none skipped) in both engines gives `expected`."""
    spec = SpeculativeConfig(num_speculative_tokens=4, ngram_min=1, adaptive=False)
    outputs, single = generate_one(ours.model, ours.tokenizer, ids, params, spec)
    paged = LLMEngine(ours.model, ours.tokenizer, EngineConfig(max_num_seqs=2, block_size=4, num_blocks=32,
                                                                speculative=spec))
    assert output_tokens(outputs) == expected and run_to_completion(paged, [ids], params) == [expected]
    assert single.num_spec_proposed > 0 and paged.num_spec_proposed > 0


def longrope_phi3(tmp_path, hf_tokenizer, original: int):
    """A Phi-3 whose LongRoPE switches to its long factors beyond `original` tokens."""
    _, _, extra = FAMILY_CONFIGS["phi3"]
    return write_family_folder(tmp_path / f"phi3-{original}", hf_tokenizer, "phi3",
                               original_max_position_embeddings=original,
                               rope_scaling=extra["rope_scaling"] | {"original_max_position_embeddings": original})


@torch.inference_mode()
def test_longrope_uses_its_long_factors_for_a_pass_beyond_the_original_context(tmp_path, hf_tokenizer,
                                                                                default_gguf_path):
    import transformers

    folder = longrope_phi3(tmp_path, hf_tokenizer, original=16)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_model(folder, "float32", "cpu")
    from_gguf = load_model(write_family_gguf(folder, tmp_path / "phi3.gguf", default_gguf_path), "float32", "cpu")
    long_ids = ours.tokenizer.encode(PROMPTS["emoji"] + " " + PROMPTS["code"])  # beyond 16 tokens
    short_ids = long_ids[:12]
    assert len(long_ids) > 16
    for ids in (short_ids, long_ids):
        expected = ref(torch.tensor([ids])).logits
        for model in (ours, from_gguf):
            assert (model.model(torch.tensor([ids])) - expected).abs().max().item() < 1e-4
    # A short prompt decodes on the short factors, then on the long ones past 16 positions, as
    # transformers' cached decoding does; the same through the paged engine.
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = hf_greedy(ref, short_ids, 24)
    assert output_tokens(generate_one(ours.model, ours.tokenizer, short_ids, params)[0]) == expected
    engine = LLMEngine(ours.model, ours.tokenizer, EngineConfig(max_num_seqs=2, block_size=4, num_blocks=32))
    assert run_to_completion(engine, [short_ids, long_ids], params) == [expected, hf_greedy(ref, long_ids, 24)]
    assert_speculation_changes_nothing(ours, short_ids, params, expected)
    # Only the long factors make the long prompt's answer: without them it differs.
    short_only = load_model(longrope_phi3(tmp_path, hf_tokenizer, original=1024), "float32", "cpu")
    assert (short_only.model(torch.tensor([long_ids])) - ref(torch.tensor([long_ids])).logits).abs().max() > 1e-3


@torch.inference_mode()
def test_dynamic_ntk_rope_stretches_its_base_with_the_pass_length_as_transformers_does(tmp_path, hf_tokenizer):
    import transformers

    dynamic = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    folder = write_family_folder(tmp_path / "dynamic", hf_tokenizer, "qwen3", rope_parameters=dynamic,
                                 max_position_embeddings=16)
    ours = load_model(folder, "float32", "cpu")
    assert ours.config.context_length == 64  # the trained 16 stretched 4 times
    ids = ours.tokenizer.encode(PROMPTS["emoji"] + " " + PROMPTS["code"])[:24]
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected_logits = ref(torch.tensor([ids])).logits
    assert (ours.model(torch.tensor([ids])) - expected_logits).abs().max().item() < 1e-4
    # transformers keeps the longest length it has seen: a fresh reference for cached decoding.
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = hf_greedy(ref, ids[:10], 24)  # crosses 16 positions while decoding
    assert output_tokens(generate_one(ours.model, ours.tokenizer, ids[:10], params)[0]) == expected
    engine = LLMEngine(ours.model, ours.tokenizer, EngineConfig(max_num_seqs=2, block_size=4, num_blocks=32))
    both = run_to_completion(engine, [ids[:10], ids], params)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert both == [expected, hf_greedy(ref, ids, 24)]
    # Speculation verifies proposals as if each were decoded alone: the same tokens.
    assert_speculation_changes_nothing(ours, ids[:10], params, expected)
    plain = load_model(write_family_folder(tmp_path / "plain", hf_tokenizer, "qwen3", max_position_embeddings=16),
                       "float32", "cpu")
    plain_ids = ids[:16]  # within the trained context, dynamic NTK changes nothing
    assert torch.equal(plain.model(torch.tensor([plain_ids])), ours.model(torch.tensor([plain_ids])))
    assert (plain.model(torch.tensor([ids])) - expected_logits).abs().max().item() > 1e-3


@torch.inference_mode()
def test_a_verification_chunk_rotates_each_token_as_a_decode_step_would(tmp_path, hf_tokenizer):
    from leapllm.model.paged_kv_cache import PagedKVCache, build_paged_batch

    dynamic = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    models = [load_model(write_family_folder(tmp_path / "dynamic", hf_tokenizer, "qwen3", rope_parameters=dynamic,
                                             max_position_embeddings=16), "float32", "cpu"),
              load_model(longrope_phi3(tmp_path, hf_tokenizer, original=16), "float32", "cpu")]
    for ours in models:
        model, c = ours.model, ours.config
        ids = ours.tokenizer.encode(PROMPTS["emoji"] + " " + PROMPTS["code"])[:19]
        prefix, chunk = ids[:14], ids[14:]  # positions 14 .. 18: the pass length crosses 16 inside the chunk
        cache = model.new_kv_cache(1, 32)
        model(torch.tensor([prefix]), 0, cache)
        one_by_one = torch.cat([model(torch.tensor([[t]]), 14 + i, cache)[0] for i, t in enumerate(chunk)])
        for verify, close in ((True, True), (False, False)):
            cache = model.new_kv_cache(1, 32)
            model(torch.tensor([prefix]), 0, cache)
            rows = model(torch.tensor([chunk]), 14, cache, verify=verify)[0]
            assert ((rows - one_by_one).abs().max().item() < 1e-4) == close, (c.architecture, verify)
        # The paged engine's batch says the same with a verification chunk.
        paged = PagedKVCache(c.num_layers, 8, 4, c.num_kv_heads, c.head_dim, model.dtype, "cpu")
        table = [0, 1, 2, 3, 4]
        prefill = build_paged_batch([], [(table, 0, 14)], 4, torch.device("cpu"))
        model.forward_paged(torch.tensor(prefix), paged, prefill, torch.tensor([13]))
        batch = build_paged_batch([], [(table, 14, 5, True)], 4, torch.device("cpu"))
        rows = model.forward_paged(torch.tensor(chunk), paged, batch, torch.arange(5))
        assert (rows - one_by_one).abs().max().item() < 1e-4, c.architecture


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_attention_maps_match_transformers_eager_attention_probabilities(loaded, family):
    ours, ref = loaded[family]
    ids = max((ours.tokenizer.encode(PROMPTS[name]) for name in PROMPT_NAMES), key=len)
    before = ref.config._attn_implementation
    ref.set_attn_implementation("eager")  # the implementation that returns its probabilities
    try:
        expected = ref(torch.tensor([ids]), output_attentions=True).attentions
    finally:
        ref.set_attn_implementation(before)
    maps = ours.model.attention_maps(torch.tensor([ids]))
    assert len(maps) == len(expected) == ours.config.num_layers
    for layer, (got, want) in enumerate(zip(maps, expected)):
        assert got.shape == want.shape == (1, ours.config.num_heads, len(ids), len(ids))
        assert (got - want).abs().max().item() < 1e-5, layer
    if ours.config.sliding_window is not None:  # a windowed layer's query gives no weight beyond its window
        assert len(ids) > ours.config.sliding_window
        windowed = next(m for m, layer in zip(maps, ours.model.layers) if layer.attn.core.window is not None)
        assert windowed[0, :, -1, : len(ids) - ours.config.sliding_window].abs().max() == 0
