"""The systems a benchmark compares, each behind the same small interface.

    system.import_libraries()   import what it needs (kept out of its memory figure)
    system.load()               load the model file
    system.prefill(ids) -> seconds
    system.decode(ids, n) -> (seconds, tokens)
    system.batched_decode(batch_ids, n) -> (seconds, tokens per row)
    system.serve(prompts, n) -> (seconds, first-token seconds per request, tokens per request)
    system.speculation_counts() -> {"proposed", "accepted", "speculative_steps"} totals so far, or
                                None when the system does not speculate
    system.info() -> dict       facts for the report (weights format, library settings)

Decoding is greedy. `decode` and `batched_decode` generate n tokens per row: the first comes out
of the prompt's prefill, which is not timed; `seconds` is the time of the n - 1 decode steps after
it. Every row of a batch has the same prompt length, so no padding or attention mask is needed.

`serve` is batched serving: every request (each with its own prompt) arrives at once, at t0, and
gets n greedy tokens (EOS ignored). `seconds` runs from t0 until the last request has its n tokens,
prefill included; each request's first-token time is counted from t0 too. Setup (an engine or a
context with room for every request) is not timed, and is fresh for every call, so nothing of a
previous call (a prefix cache, a KV cache) is reused.

A speculative system, `leapllm-<dtype>+ngram` or `leapllm-<dtype>+draft`, is its base system
(`leapllm-<dtype>`, loaded the same way) with speculative decoding on: prompt lookup, or a draft model
(`--draft-model`, loaded as given) proposing up to k tokens a step that the model checks in one pass.
Greedy output stays the base's token for token (the harness checks it). Its `decode` (LLM.run) and
`serve` (the engine, while at most 4 sequences decode) speculate; `batched_decode` is the plain loop.

Peak memory is not a method: each system runs in its own worker process, which reads the process's
own peak RSS (and, on CUDA, torch's peak allocation) from `memory_snapshot()`.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from pathlib import Path
from typing import NamedTuple

MiB = 2**20

# "leapllm": exactly what the CLI does with no flags (dtype auto: a GGUF's quantized weights run as
# stored); leapllm-int4 / -int8: a float32 load re-quantized by quantize_model (QUANTIZED).
LEAPLLM_SYSTEMS = ["leapllm", "leapllm-float32", "leapllm-bfloat16", "leapllm-float16", "leapllm-int4", "leapllm-int8"]
HF_SYSTEMS = ["hf-float32", "hf-bfloat16", "hf-float16"]
# transformers with a static cache and its decode step compiled by torch.compile (CUDA graphs on a GPU).
HF_COMPILED_SYSTEMS = ["hfcompile-float32", "hfcompile-bfloat16", "hfcompile-float16"]
LLAMACPP_SYSTEMS = ["llamacpp"]
# leapllm-int4+ngram: leapllm-int4 with prompt-lookup speculation; leapllm-int4+draft: with a draft model.
SPECULATIVE_METHODS = ("ngram", "draft")
SPECULATIVE_SYSTEMS = [f"{base}+{method}" for base in LEAPLLM_SYSTEMS for method in SPECULATIVE_METHODS]
ALL_SYSTEMS = LEAPLLM_SYSTEMS + HF_SYSTEMS + HF_COMPILED_SYSTEMS + LLAMACPP_SYSTEMS + SPECULATIVE_SYSTEMS
# float16 matmuls on CPU are not a real use case
CUDA_ONLY_SYSTEMS = {"leapllm-float16", "hf-float16", "hfcompile-float16"}
CUDA_ONLY_SYSTEMS |= {f"leapllm-float16+{method}" for method in SPECULATIVE_METHODS}
DEFAULT_LEAPLLM_SYSTEMS = ["leapllm", "leapllm-float32", "leapllm-bfloat16", "leapllm-int4", "leapllm-int8"]
PEERS = {"hf": ["hf-float32", "hf-bfloat16"], "llamacpp": ["llamacpp"]}


class Quantization(NamedTuple):
    """A leapllm system on leapllm's quantized engine: float32 activations, weights quantized at load."""
    args: dict  # for leapllm.compression.quantize.quantize_model
    weights: str  # what the weights are, for the report
    llamacpp: str  # the GGUF weights llama.cpp runs at the same precision


# The "dtype" of leapllm-int4 / leapllm-int8: never a torch dtype, the model computes in float32.
QUANTIZED = {
    "int4": Quantization({"method": "int4", "group_size": 32, "head_method": "int8"},
                         "int4 groups of 32 (projections), int8 output head",
                         "Q4_1 projections with a Q8_0 output head"),
    "int8": Quantization({"method": "int8"}, "int8 per output channel (projections and output head)",
                         "Q8_0 files"),
}


class SystemMissing(Exception):
    """The system cannot be loaded here (library not installed, no GPU build, ...)."""


class Unsupported(Exception):
    """This measurement is not offered by the system's API; reported as such, never estimated."""


def split_speculation(name: str) -> tuple[str, str | None]:
    """("leapllm-int4", "ngram") for leapllm-int4+ngram; (name, None) for a system that does not speculate."""
    base, plus, method = name.partition("+")
    return (base, method) if plus else (name, None)


def base_system(name: str) -> str:
    """The system a speculative one speculates on (leapllm-int4 for leapllm-int4+draft); else the name."""
    return split_speculation(name)[0]


def speculation_method(name: str) -> str | None:
    """"ngram" or "draft" for a speculative system, else None."""
    return split_speculation(name)[1]


def system_engine_dtype(name: str) -> tuple[str, str]:
    """("leapllm", "float32") for leapllm-float32, ("leapllm", "int4") for leapllm-int4 (see QUANTIZED)
    and for leapllm-int4+ngram (a speculative system has its base's engine and dtype); llama.cpp runs
    the file's own quantized blocks."""
    name = base_system(name)
    if name == "llamacpp":
        return "llamacpp", "gguf"
    if name == "leapllm":
        return "leapllm", "auto"
    engine, dtype = name.split("-", 1)
    return engine, dtype


# -- memory ------------------------------------------------------------------------------------

def proc_status_kib(key: str) -> int | None:
    """VmRSS / VmHWM of this process in KiB, from /proc (psutil is not a dependency)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_snapshot(cuda: bool = False) -> dict:
    """This process's resident memory now and at its peak (MiB); on CUDA, torch's peak too."""
    rss, peak = proc_status_kib("VmRSS"), proc_status_kib("VmHWM")
    snap = {"rss_mib": rss / 1024 if rss is not None else None,
            "peak_rss_mib": peak / 1024 if peak is not None else None}
    if cuda:
        import torch
        snap["gpu_allocated_mib"] = torch.cuda.memory_allocated() / MiB
        snap["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / MiB
    return snap


def release_freed_memory() -> None:
    """Hand freed heap back to the OS, so the RSS baseline is not inflated by import temporaries."""
    from leapllm.loading.loader import release_freed_memory as release
    release()


# -- the systems -------------------------------------------------------------------------------

class System:
    """Base class: the shared constructor and the interface every system implements."""

    def __init__(self, name: str, path: Path, device: str, threads: int, max_seq_len: int, *,
                 draft_model: Path | None = None, num_speculative_tokens: int = 4):
        self.name = name
        self.engine, self.dtype = system_engine_dtype(name)
        self.speculative = speculation_method(name)  # None, "ngram" or "draft"
        self.path = Path(path)
        self.device = device
        self.threads = threads
        self.max_seq_len = max_seq_len  # the longest prompt + generated tokens one row will need
        self.draft_model = Path(draft_model) if draft_model is not None else None
        self.num_speculative_tokens = num_speculative_tokens

    def import_libraries(self) -> None: ...

    def load(self) -> None:
        raise NotImplementedError

    def prefill(self, ids: list[int]) -> float:
        raise NotImplementedError

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        raise NotImplementedError

    def batched_decode(self, batch_ids: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
        raise NotImplementedError

    def serve(self, prompts: list[list[int]], n: int) -> tuple[float, list[float], list[list[int]]]:
        raise NotImplementedError

    def speculation_counts(self) -> dict | None:
        return None  # does not speculate

    def info(self) -> dict:
        return {}

    def uses_cuda_allocator(self) -> bool:
        return False


class TorchSystem(System):
    """What leapllm and transformers share: torch threads, dtypes, a CUDA-aware clock."""

    def import_libraries(self) -> None:
        import torch

        # The first model built on torch's meta device imports torch's compiler stack (~70 MiB):
        # import it now, so it is not billed to one system's memory.
        import torch._dynamo  # noqa: F401
        torch.set_num_threads(self.threads)
        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise SystemMissing("torch sees no CUDA GPU")
            # The CUDA context and cuBLAS's workspace appear with the first matmul: create them
            # before the baseline is taken.
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                a = torch.ones(64, 64, device="cuda", dtype=dtype)
                a @ a
            torch.cuda.synchronize()

    def torch_dtype(self):
        import torch
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]

    def now(self) -> float:
        """Wall clock that first waits for queued GPU work, so CUDA kernels are counted."""
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()
        return time.perf_counter()

    def uses_cuda_allocator(self) -> bool:
        return self.device == "cuda"


def check_served(tokens: list[list[int]], rows: int, n: int) -> None:
    """Every request of a serve call got exactly n tokens."""
    counts = [len(t) for t in tokens]
    if len(counts) != rows or any(c != n for c in counts):
        raise RuntimeError(f"serving {rows} requests of {n} tokens returned {counts} tokens")


def weight_mib(model) -> float:
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}  # tied once
    return sum(t.numel() * t.element_size() for t in tensors.values()) / MiB


def quantized_kernels(model) -> str:
    """Which kernels run the model's quantized layers: "leapllm VNNI kernels", "leapllm AVX2 kernels",
    "leapllm portable kernels" or "PyTorch kernels" (with layer counts when they differ from layer to layer)."""
    from leapllm.model.quantized.layers import QUANTIZED_LAYERS

    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QUANTIZED_LAYERS):
            packed = m.packed_linear
            kind = "PyTorch kernels" if packed is None else f"leapllm {packed.kernel} kernels"
            counts[kind] = counts.get(kind, 0) + 1
    if len(counts) <= 1:
        return next(iter(counts), "none (no quantized layer)")
    return ", ".join(f"{kind} ({n} layers)" for kind, n in counts.items())


class LeapllmSystem(TorchSystem):
    """leapllm's own engine: `LLM(path, dtype=..., device=...)`; for leapllm-int4 / leapllm-int8, a
    float32 model whose linear layers are then quantized (QUANTIZED), as part of loading."""

    def import_libraries(self) -> None:
        super().import_libraries()
        import leapllm.llm  # noqa: F401
        from leapllm.kernels import cpu_kernels
        cpu_kernels()  # loads the compiled kernels' shared library, as importing llama_cpp loads its own
        if self.dtype in QUANTIZED:
            importlib.import_module("leapllm.compression.quantize")

    def speculative_args(self) -> dict:
        """LLM(...) keyword arguments of a speculative system; {} for its base."""
        if self.speculative is None:
            return {}
        if self.speculative == "ngram":
            return {"speculative": "ngram", "num_speculative_tokens": self.num_speculative_tokens}
        if self.draft_model is None:
            raise SystemMissing(f"{self.name} needs a draft model: give --draft-model PATH")
        return {"draft_model": self.draft_model, "num_speculative_tokens": self.num_speculative_tokens}

    def load(self) -> None:
        from leapllm import LLM
        from leapllm.config import EngineConfig
        quantization = QUANTIZED.get(self.dtype)
        # The draft model (if any) is loaded by LLM with the model's compute dtype and never quantized
        # here: quantize_model below only sees the target.
        # The float32 system is the quality reference: its keys and values stay float32 too.
        engine_config = EngineConfig(kv_cache_dtype="float32") if self.dtype == "float32" else None
        self.llm = LLM(self.path, dtype="float32" if quantization else self.dtype, device=self.device,
                       engine_config=engine_config, **self.speculative_args())
        if quantization:
            from leapllm.compression.quantize import quantize_model
            quantize_model(self.llm.model, **quantization.args)
        self.model = self.llm.model
        self.torch_device = self.model.device

    def speculation_counts(self) -> dict | None:
        if self.llm.speculative is None:
            return None
        stats = self.llm.speculation_stats  # totals of every run() so far; empty until something is proposed
        return {k: int(stats.get(k, 0)) for k in ("proposed", "accepted", "speculative_steps")}

    def prefill(self, ids: list[int]) -> float:
        import torch
        with torch.inference_mode():
            tokens = torch.tensor([ids], device=self.torch_device)
            start = self.now()
            # The cache is allocated inside the timed region: transformers builds its cache inside
            # the forward call, and generation allocates ours right before prefill too.
            cache = self.model.new_kv_cache(1, len(ids) + 1, self.llm.engine_config.kv_cache_dtype)
            self.model(tokens, 0, cache, last_only=True)
            return self.now() - start

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        from leapllm import SamplingParams
        # The loop generation itself uses (sampler, detokenizer, stop checks), greedy.
        out = self.llm.run(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        if len(out.token_ids) != n:
            raise RuntimeError(f"generated {len(out.token_ids)} tokens instead of {n}")
        # run() times from the first token to the last (int() of each sampled token syncs CUDA).
        return (n - 1) / out.timings["decode_tokens_per_s"], out.token_ids

    def batched_decode(self, batch_ids: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
        import torch
        with torch.inference_mode():
            tokens = torch.tensor(batch_ids, device=self.torch_device)
            rows, length = tokens.shape
            cache = self.model.new_kv_cache(rows, length + n, self.llm.engine_config.kv_cache_dtype)
            # The prompts (not timed) a few rows at a time, at most the serving engine's tokens per
            # step, as llama.cpp prefills one sequence per call: 32 rows in one pass would hold
            # activations for 4,096 tokens.
            group = max(1, self.llm.engine_config.max_num_batched_tokens // length)
            nxt = torch.cat([self.model(tokens[lo:lo + group], 0, cache.rows(lo, min(lo + group, rows)),
                                        last_only=True)[:, -1].argmax(-1) for lo in range(0, rows, group)])
            steps = [nxt.tolist()]
            start = self.now()
            for pos in range(length, length + n - 1):
                logits = self.model(nxt[:, None], pos, cache, last_only=True)
                nxt = logits[:, -1].argmax(-1)
                steps.append(nxt.tolist())  # to the host every step, as a server checking stops would
            seconds = self.now() - start
        return seconds, [list(row) for row in zip(*steps)]

    def serve_engine(self, rows: int, tokens_per_row: int):
        """A fresh serving engine (continuous batching, paged KV cache, prefix caching) with LLM's engine
        config, the default one: 64 sequences at once, a 1 GB KV pool. Only when that cannot hold every
        request at once are max_num_seqs and the pool raised to what they need."""
        import dataclasses
        import gc

        from leapllm.engine.llm_engine import LLMEngine

        config = self.llm.engine_config
        if rows > config.max_num_seqs:
            config = dataclasses.replace(config, max_num_seqs=rows,
                                         max_num_batched_tokens=max(config.max_num_batched_tokens, rows))
        engine = LLMEngine(self.model, self.llm.tokenizer, config)
        need = rows * engine.allocator.blocks_needed(tokens_per_row)
        if need > engine.allocator.num_blocks:
            del engine
            gc.collect()
            engine = LLMEngine(self.model, self.llm.tokenizer, dataclasses.replace(config, num_blocks=need))
        return engine

    def serve(self, prompts: list[list[int]], n: int) -> tuple[float, list[float], list[list[int]]]:
        from leapllm import SamplingParams

        rows = len(prompts)
        # A new engine every call (not timed, as llama.cpp's new context): the prefix cache of the
        # engine that served the previous repeat holds these very prompts.
        engine = self.serve_engine(rows, max(map(len, prompts)) + n)
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        ids = [f"serve-{i}" for i in range(rows)]
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        first: dict[str, float] = {}
        start = self.now()
        for rid, prompt in zip(ids, prompts):  # the way LLM.generate drives the engine
            engine.add_request(rid, list(prompt), params)
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
                if out.first_token_time is not None:  # the engine's clock when it sampled the token
                    first.setdefault(out.request_id, out.first_token_time)
        seconds = self.now() - start
        rows_out = [tokens[rid] for rid in ids]
        check_served(rows_out, rows, n)
        return seconds, [first[rid] - start for rid in ids], rows_out

    def info(self) -> dict:
        c = self.llm.engine_config
        serving = (f"leapllm's engine: continuous batching, max_num_seqs {c.max_num_seqs}, "
                   f"max_num_batched_tokens {c.max_num_batched_tokens}, paged KV cache of {c.block_size}-token "
                   f"blocks ({c.kv_cache_gb:g} GB), prefix caching {'on' if c.enable_prefix_caching else 'off'}")
        quantization = QUANTIZED.get(self.dtype)
        if quantization:
            out = {"weights": f"{quantization.weights}; kernel: {quantized_kernels(self.model)}",
                   "compute_dtype": "float32", "weights_mib": round(weight_mib(self.model), 1), "serve": serving}
        elif self.dtype == "auto":
            kinds = self.model.config.extra.get("kernels_by_type", {})
            stored = "; ".join(f"{t}: {', '.join(how)}" for t, how in kinds.items())
            out = {"weights": f"as the file stores them ({stored}); kernel: {quantized_kernels(self.model)}",
                   "compute_dtype": str(self.model.dtype).removeprefix("torch."),
                   "weights_mib": round(weight_mib(self.model), 1), "serve": serving}
        else:
            out = {"weights": f"dequantized to {self.dtype}", "weights_mib": round(weight_mib(self.model), 1),
                   "serve": serving}
        return out | self.speculation_info()

    def speculation_info(self) -> dict:
        spec = self.llm.speculative
        if spec is None:
            return {}
        k = spec.num_speculative_tokens
        where = ("batch-1 decode (LLM.run) and the serving engine while at most "
                 f"{spec.max_batch_size} sequences decode; the batched-decode loop does not speculate")
        if spec.method == "ngram":
            return {"speculation": f"n-gram prompt lookup, up to {k} tokens a step, in {where}"}
        draft = spec.draft_model
        return {"speculation": f"draft model {self.draft_model}, up to {k} tokens a step, in {where}",
                "draft_dtype": str(draft.dtype).removeprefix("torch."),
                "draft_weights_mib": round(weight_mib(draft), 1)}


class HFSystem(TorchSystem):
    """Hugging Face transformers on the same GGUF file (dequantized at load, like leapllm)."""

    def import_libraries(self) -> None:
        super().import_libraries()
        try:
            import transformers.models.llama.modeling_llama  # noqa: F401
            from transformers import AutoModelForCausalLM  # noqa: F401
        except ImportError as exc:
            raise SystemMissing(f"transformers is not installed ({exc}); pip install 'leapllm[test]'") from None

    def load(self) -> None:
        import inspect

        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                     dtype=self.torch_dtype())
        self.model = model.to(self.device).eval()
        # transformers renamed `past_key_values` to `cache` (5.2x); speak whichever this one knows.
        params = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def step(self, tokens, cache=None):
        kwargs = {self.cache_arg: cache} if cache is not None else {}
        # logits_to_keep=1 is what generate() passes, and matches leapllm's last_only=True.
        return self.model(input_ids=tokens, use_cache=True, logits_to_keep=1, **kwargs)

    def prefill(self, ids: list[int]) -> float:
        import torch
        with torch.inference_mode():
            tokens = torch.tensor([ids], device=self.device)
            start = self.now()
            self.step(tokens)
            return self.now() - start

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        seconds, rows = self.batched_decode([ids], n)
        return seconds, rows[0]

    def batched_decode(self, batch_ids: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
        # A greedy loop on transformers' own cache: the same work as leapllm's loop.
        import torch
        with torch.inference_mode():
            tokens = torch.tensor(batch_ids, device=self.device)
            logits, cache = self.prefill_cache(tokens)
            nxt = logits[:, -1].argmax(-1)
            steps = [nxt.tolist()]
            start = self.now()
            for i in range(n - 1):
                nxt = self.decode_step(nxt[:, None], cache, tokens.shape[1] + i)[:, -1].argmax(-1)
                steps.append(nxt.tolist())
            seconds = self.now() - start
        return seconds, [list(row) for row in zip(*steps)]

    def prefill_cache(self, tokens):
        """The prompt's pass: (its last logits, the cache the decode steps extend)."""
        out = self.step(tokens)
        return out.logits, out[self.cache_arg]

    def decode_step(self, tokens, cache, position: int):
        """One step of (rows, 1) tokens at `position` -> logits; the cache grows in place."""
        return self.step(tokens, cache).logits

    def serve(self, prompts: list[list[int]], n: int) -> tuple[float, list[float], list[list[int]]]:
        raise Unsupported("transformers has no continuous batching (generate() runs one padded batch "
                          "start to end)")

    def info(self) -> dict:
        # Some transformers versions keep GGUF blocks packed (with the `kernels` package) instead of
        # dequantizing: a different computation, so the report says which one ran.
        packed = sum("gguf" in type(m).__name__.lower() for m in self.model.modules())
        return {"weights": f"{packed} modules with packed GGUF blocks" if packed else f"dequantized to {self.dtype}",
                "weights_mib": round(weight_mib(self.model), 1),
                "attention": self.model.config._attn_implementation}


class HFCompiledSystem(HFSystem):
    """transformers as its documentation makes generation fast: a static KV cache (StaticCache, as long
    as the longest row needs) and the decode step compiled by torch.compile in mode "reduce-overhead"
    (CUDA graphs on a GPU). Compiling happens in the warm-up round, once per batch size."""

    def load(self) -> None:
        import torch
        super().load()
        self.compiled = torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=True)

    def prefill_cache(self, tokens):
        import torch
        from transformers import StaticCache
        cache = StaticCache(config=self.model.config, max_cache_len=self.max_seq_len)
        out = self.model(input_ids=tokens, use_cache=True, logits_to_keep=1, **{self.cache_arg: cache},
                         cache_position=torch.arange(tokens.shape[1], device=self.device))
        return out.logits, cache

    def decode_step(self, tokens, cache, position: int):
        import torch
        torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs were read: reuse them
        return self.compiled(input_ids=tokens, use_cache=True, logits_to_keep=1, **{self.cache_arg: cache},
                             cache_position=torch.tensor([position], device=self.device)).logits

    def info(self) -> dict:
        return super().info() | {"decode": "StaticCache + torch.compile(mode='reduce-overhead')"}


LLAMACPP_INSTALL_HINT = ("pip install 'leapllm[bench]' builds it from source, see benchmarks/README.md")


class LlamaCppSystem(System):
    """llama.cpp through llama-cpp-python, on the same GGUF file, computing on its quantized blocks.

    Batch 1 uses the high-level `Llama` object (`eval`, logits read with `llama_get_logits_ith`).
    Batched decoding uses the low-level API the way llama.cpp's own batched-bench does: a second
    context with one KV sequence per row, and one `llama_batch` per step holding every row's token
    under its own `seq_id`, decoded by a single `llama_decode` call. Batched serving does the same
    after prefilling every request's prompt (each under its own `seq_id`) in `llama_decode` calls of
    up to SERVE_N_BATCH tokens, as llama-server packs the prompts of its slots into its batches.
    """

    N_BATCH = 512
    SERVE_N_BATCH = 2048  # llama-server's default n_batch (its n_ubatch: 512, N_BATCH)

    def import_libraries(self) -> None:
        try:
            import llama_cpp  # noqa: F401 - loads the shared library
        except ImportError as exc:
            raise SystemMissing(f"llama-cpp-python is not installed ({exc}); {LLAMACPP_INSTALL_HINT}") from None
        import numpy  # noqa: F401
        if self.device == "cuda" and not llama_cpp.llama_supports_gpu_offload():
            raise SystemMissing("this llama-cpp-python build has no GPU offload (rebuild it with "
                                "CMAKE_ARGS=\"-DGGML_CUDA=ON\")")

    def load(self) -> None:
        import llama_cpp
        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(self.path), n_ctx=self.max_seq_len, n_batch=self.N_BATCH,
            n_threads=self.threads, n_threads_batch=self.threads,
            n_gpu_layers=-1 if self.device == "cuda" else 0, logits_all=False, verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()

    def argmax(self, ctx, index: int) -> int:
        import numpy as np
        ptr = self.lib.llama_get_logits_ith(ctx, index)
        if not ptr:
            raise RuntimeError(f"llama.cpp has no logits for batch index {index}")
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()  # eval() then drops what the KV cache held
        start = time.perf_counter()
        self.llm.eval(ids)  # logits of the last position only (logits_all=False)
        self.lib.llama_synchronize(self.llm.ctx)
        return time.perf_counter() - start

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        self.llm.reset()
        self.llm.eval(ids)
        tokens = [self.argmax(self.llm.ctx, -1)]
        start = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([tokens[-1]])
            tokens.append(self.argmax(self.llm.ctx, -1))
        return time.perf_counter() - start, tokens

    @contextlib.contextmanager
    def batched_context(self, rows: int, tokens_per_row: int, n_batch: int):
        """A fresh context with one KV sequence per row, room for tokens_per_row in each, and a
        `llama_batch` of n_batch tokens (setup, not timed); both freed on leaving."""
        lib = self.lib
        if rows > lib.llama_max_parallel_sequences():
            raise Unsupported(f"llama.cpp supports at most {lib.llama_max_parallel_sequences()} sequences")
        per_row = -(-tokens_per_row // 256) * 256  # llama.cpp splits n_ctx evenly between sequences
        params = lib.llama_context_default_params()
        params.n_ctx = rows * per_row
        params.n_seq_max = rows
        params.n_batch = n_batch
        params.n_ubatch = min(params.n_batch, self.N_BATCH)
        params.n_threads = params.n_threads_batch = self.threads
        params.flash_attn_type = self.llm.context_params.flash_attn_type  # same settings as batch 1
        params.no_perf = True
        ctx = lib.llama_init_from_model(self.llm.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {rows} sequences")
        batch = lib.llama_batch_init(params.n_batch, 0, 1)
        try:
            yield ctx, batch
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)

    def submit(self, ctx, batch, entries) -> None:
        """One `llama_decode` of [(token, position, sequence, wants logits)]."""
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, int(logits)
        rc = self.lib.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def batched_decode(self, batch_ids: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
        rows, length = len(batch_ids), len(batch_ids[0])
        with self.batched_context(rows, length + n, max(length, rows)) as (ctx, batch):
            tokens = []
            for row, ids in enumerate(batch_ids):  # the prompts (not timed), one sequence each
                self.submit(ctx, batch, [(t, p, row, p == length - 1) for p, t in enumerate(ids)])
                tokens.append([self.argmax(ctx, length - 1)])
            start = time.perf_counter()
            for pos in range(length, length + n - 1):
                self.submit(ctx, batch, [(tokens[row][-1], pos, row, True) for row in range(rows)])
                for row in range(rows):
                    tokens[row].append(self.argmax(ctx, row))
            self.lib.llama_synchronize(ctx)
            return time.perf_counter() - start, tokens

    def serve(self, prompts: list[list[int]], n: int) -> tuple[float, list[float], list[list[int]]]:
        rows = len(prompts)
        n_batch = max(self.SERVE_N_BATCH, rows)
        with self.batched_context(rows, max(map(len, prompts)) + n, n_batch) as (ctx, batch):
            # Every prompt token in arrival order, under its request's seq_id; logits at each last one.
            pending = [(t, p, row, p == len(ids) - 1) for row, ids in enumerate(prompts) for p, t in enumerate(ids)]
            tokens: list[list[int]] = [[] for _ in prompts]
            first = [0.0] * rows
            start = time.perf_counter()
            for lo in range(0, len(pending), n_batch):
                chunk = pending[lo:lo + n_batch]
                self.submit(ctx, batch, chunk)
                for i, (_, _, row, last) in enumerate(chunk):
                    if last:  # this call held the prompt's last token: its first token is out
                        tokens[row].append(self.argmax(ctx, i))
                        first[row] = time.perf_counter() - start
            for step in range(n - 1):  # then one batch per step with every request's next token
                self.submit(ctx, batch, [(tokens[row][-1], len(prompts[row]) + step, row, True)
                                         for row in range(rows)])
                for row in range(rows):
                    tokens[row].append(self.argmax(ctx, row))
            self.lib.llama_synchronize(ctx)
            seconds = time.perf_counter() - start
        check_served(tokens, rows, n)
        return seconds, first, tokens

    def info(self) -> dict:
        cp = self.llm.context_params
        return {"weights": "the file's quantized blocks (llama.cpp kernels)",
                "flash_attn": cp.flash_attn_type == self.lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                "n_batch": cp.n_batch, "n_ubatch": cp.n_ubatch, "n_ctx": cp.n_ctx,
                "serve": f"one context with a sequence per request, n_batch {self.SERVE_N_BATCH}, "
                         f"n_ubatch {self.N_BATCH}",
                "gpu_offload": self.device == "cuda",
                "system_info": self.lib.llama_print_system_info().decode(errors="replace").strip()}


def make_system(name: str, path: Path, device: str, threads: int, max_seq_len: int, *,
                draft_model: Path | None = None, num_speculative_tokens: int = 4) -> System:
    if name not in ALL_SYSTEMS:
        raise SystemMissing(f"unknown system {name!r}")
    cls = {"leapllm": LeapllmSystem, "hf": HFSystem, "hfcompile": HFCompiledSystem,
           "llamacpp": LlamaCppSystem}[system_engine_dtype(name)[0]]
    return cls(name, path, device, threads, max_seq_len, draft_model=draft_model,
               num_speculative_tokens=num_speculative_tokens)
