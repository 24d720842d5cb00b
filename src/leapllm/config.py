"""Validated settings of the runtime, in one place: the model to load, the server's, the engine's
(batching, KV cache), speculative decoding's, distillation's, the pruning methods, and the
sampling defaults of the command line.
Everything that turns user input into these (CLI flags, the server, Ray replicas, tensor-parallel
ranks) builds them here and calls validate(); the layers below read them and never check them again.

ModelSettings and ServerSettings are what the `leapllm` commands are given, so their errors name
the command-line flags, the names users know them by. This module sits below every other one: it
imports only leapllm.errors and the standard library."""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import MappingProxyType

from leapllm.errors import InvalidRequestError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: float32 on CPU, bfloat16 on CUDA
# How KV caches store keys and values (model/kv_cache.py's kv_storage_dtype): "auto" is float16 where
# the model computes in float32 on a CPU (half the bytes, as llama.cpp's default), else the model's dtype.
KV_DTYPES = ("auto", "float16", "float32", "int8")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")  # uvicorn's
SPECULATIVE_METHODS = ("ngram", "draft")
PRUNING_METHODS = ("magnitude", "wanda", "2:4", "heads", "ffn")  # leapllm prune --method
PRUNING_ALLOCATIONS = ("uniform", "global")  # how a structured --sparsity spreads over the layers
MAX_SPECULATIVE_TOKENS = 7  # k + 1 verified rows fit the fused kernels' 8-row tiles


@dataclass
class SpeculativeConfig:
    method: str = "ngram"  # "ngram" (prompt lookup) or "draft" (a draft model)
    num_speculative_tokens: int = 4  # k: tokens proposed per step at most
    draft_model: object | None = None  # a Transformer (method "draft")
    ngram_max: int = 4  # prompt lookup matches the last ngram_max .. ngram_min tokens, longest first
    # Not 1: a proposal after a single matching token is mostly wrong, and a lost verification
    # costs more than it saves (benchmarks/README.md has the acceptance by match length).
    ngram_min: int = 2
    adaptive: bool = True  # measure, and stop speculating while it does not pay
    max_batch_size: int = 4  # the serving engine speculates only while at most this many sequences decode

    def validate(self) -> None:
        k = self.num_speculative_tokens
        if self.method not in SPECULATIVE_METHODS:
            raise InvalidRequestError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise InvalidRequestError(
                f"num_speculative_tokens must be an integer from 1 to {MAX_SPECULATIVE_TOKENS}, got {k!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise InvalidRequestError(f"ngram sizes need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.method == "draft" and self.draft_model is None:
            raise InvalidRequestError("speculative method 'draft' needs a draft model")
        if self.max_batch_size < 1:
            raise InvalidRequestError(f"max_batch_size must be at least 1, got {self.max_batch_size}")


@dataclass
class EngineConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # tokens per step (decode tokens + prefill chunks)
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_gb: float = 1.0  # size of the KV pool
    num_blocks: int | None = None  # overrides kv_cache_gb (tests use small pools)
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # one of KV_DTYPES; "int8": ~3.8x the tokens per GB of float32
    speculative: SpeculativeConfig | None = None  # speculative decoding of small batches (engine/speculative.py)
    # One request at a time on a contiguous KV cache, where a quantized model's batch-1 decode step
    # is one fused C++ call: what LLM.run and `leapllm generate` use (engine/model_runner.py).
    single_sequence: bool = False
    # On CPU, run each step on as many threads (up to torch's count) as other processes leave cores
    # free (engine/cpu_threads.py); off: always torch's count.
    follow_free_cores: bool = True
    # On a GPU, decode steps replay CUDA graphs captured at start (engine/decode_graphs.py); True runs
    # every step eagerly (vLLM's name for it).
    enforce_eager: bool = False

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise InvalidRequestError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidRequestError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                f"({self.max_num_seqs})")
        if self.block_size < 1:
            raise InvalidRequestError(f"block_size must be at least 1, got {self.block_size}")
        if self.kv_cache_dtype not in KV_DTYPES:
            raise InvalidRequestError(f"kv_cache_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.num_blocks is None and not self.kv_cache_gb > 0:
            raise InvalidRequestError(f"kv_cache_gb must be positive, got {self.kv_cache_gb}")
        if self.single_sequence and (self.max_num_seqs != 1 or self.enable_prefix_caching):
            raise InvalidRequestError("a single-sequence engine runs one request at a time without prefix caching")
        if self.speculative is not None:
            self.speculative.validate()


# The command line samples like llama.cpp's CLI: a little below temperature 1 with the unlikely tail
# cut, which reads better than greedy or unfiltered text; SamplingParams and the server keep the
# OpenAI API's defaults (temperature 1, no filters) so that API clients get what they expect.
CLI_SAMPLING_DEFAULTS = MappingProxyType({"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05})


def available_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity), or every CPU where the OS does not say."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def check_threads(threads: int | None) -> None:
    """CPU threads for PyTorch: None (PyTorch's default) or at least 1."""
    if threads is not None and threads < 1:
        raise InvalidRequestError(f"--threads must be at least 1, got {threads}")


@dataclass
class ModelSettings:
    """Which model to load and how: what `LLM(...)` is given, on one process or split over several."""
    model: str | None = None  # GGUF file or Hugging Face safetensors folder; None: the default model
    dtype: str = "auto"  # one of DTYPES
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    threads: int | None = None  # CPU threads for PyTorch; None: PyTorch's default
    tensor_parallel: int = 1  # processes the model is split over

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidRequestError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_threads(self.threads)
        if self.tensor_parallel < 1:
            raise InvalidRequestError(f"--tensor-parallel must be at least 1, got {self.tensor_parallel}")


@dataclass
class ServerSettings:
    """`leapllm serve`: where it listens, who may call it, how it stops, and what else it serves
    (encoders, or engine replicas on Ray Serve instead of one engine)."""
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free one
    api_key: str | None = None  # required as 'Authorization: Bearer KEY' on /v1/* when set
    served_model_name: str | None = None  # None: the model file's name
    max_waiting: int = 256  # requests that may wait for a slot; beyond that the server answers 503
    max_request_bytes: int = 8 * 2**20  # a larger request body gets 413
    shutdown_timeout: float = 30.0  # seconds requests in flight get to finish after SIGTERM
    log_level: str = "info"  # one of LOG_LEVELS
    embedding_model: str | None = None  # an encoder folder for /v1/embeddings, or "default"
    embedding_int8: bool = False
    classifier: str | None = None  # a classifier folder for /v1/classify (leapllm-trained or fine-tuned)
    qa_model: str | None = None  # a fine-tuned *ForQuestionAnswering folder for /v1/qa
    ner_model: str | None = None  # a fine-tuned *ForTokenClassification folder for /v1/ner
    replicas: int | None = None  # engine replicas on Ray Serve; None: one engine in this process
    max_replicas: int | None = None  # autoscale between replicas and max_replicas
    ray_address: str | None = None  # the Ray cluster of the replicas; None: auto, a local Ray instance
    reports: str | None = None  # a folder of profile and bench reports the dashboard shows

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidRequestError(f"--port must be between 0 and 65535, got {self.port}")
        if self.max_waiting < 0:
            raise InvalidRequestError(f"--max-waiting must be at least 0, got {self.max_waiting}")
        if self.max_request_bytes < 1024:
            raise InvalidRequestError(f"--max-request-bytes must be at least 1024, got {self.max_request_bytes}")
        if not self.shutdown_timeout >= 0:
            raise InvalidRequestError(f"--shutdown-timeout must be at least 0, got {self.shutdown_timeout}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise InvalidRequestError("--served-model-name must not be empty")
        if self.api_key is not None and not self.api_key:
            raise InvalidRequestError("--api-key must not be empty")
        if self.reports is not None and not os.path.isdir(self.reports):
            raise InvalidRequestError(f"--reports must be a folder, got {self.reports!r}")
        if self.log_level not in LOG_LEVELS:
            raise InvalidRequestError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.replicas is None:
            for name, value in (("--max-replicas", self.max_replicas), ("--ray-address", self.ray_address)):
                if value is not None:
                    raise InvalidRequestError(f"{name} needs --replicas")
            return
        if self.replicas < 1:
            raise InvalidRequestError(f"--replicas must be at least 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise InvalidRequestError(
                f"--max-replicas ({self.max_replicas}) must be at least --replicas ({self.replicas})")
        for flag, value in (("--embedding-model", self.embedding_model), ("--classifier", self.classifier),
                            ("--qa-model", self.qa_model), ("--ner-model", self.ner_model)):
            if value is not None:
                raise InvalidRequestError(f"{flag} is not served by --replicas; run it in a separate leapllm serve")
        if self.reports is not None:
            raise InvalidRequestError("--reports is not served by --replicas: Ray Serve's proxy serves the API only")
        if self.ray_address is not None and not self.ray_address.strip():
            raise InvalidRequestError("--ray-address must not be empty (auto starts a local Ray instance)")


@dataclass(frozen=True)
class DistillSettings:
    """`leapllm distill`: everything that decides the result; a checkpoint only resumes a run with the same
    settings."""

    # The defaults fit a small CPU budget: 40 steps of one 256-token window (~10k tokens) took 22 min on
    # a busy 2-core machine and took SmolLM2 pruned to half its MLP channels from perplexity 33.1 to 19.3.
    steps: int = 40
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft (teacher) term; 1 - alpha for the hard labels
    lr: float = 5e-4
    seq_len: int = 256
    batch_size: int = 1
    warmup_fraction: float = 0.1  # of the steps, linear warmup of the learning rate
    weight_decay: float = 0.0
    seed: int = 0
    train_embeddings: bool = False  # the embedding (and a tied head) is a third of SmolLM2: frozen by default

    def check(self) -> None:
        if self.steps < 1:
            raise InvalidRequestError(f"--steps must be at least 1, got {self.steps}")
        if not self.temperature > 0:
            raise InvalidRequestError(f"--temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidRequestError(f"--alpha must be between 0 and 1, got {self.alpha}")
        if not self.lr > 0:
            raise InvalidRequestError(f"--lr must be positive, got {self.lr}")
        if self.seq_len < 2:
            raise InvalidRequestError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise InvalidRequestError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise InvalidRequestError(f"warmup fraction must be in [0, 1), got {self.warmup_fraction}")

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_fraction * self.steps)
