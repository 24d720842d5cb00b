"""`leapllm serve`: the OpenAI-compatible HTTP server.

    leapllm serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                  [--max-num-seqs 64] [--kv-cache-gb 1.0] ...
                  [--tensor-parallel N | --replicas N [--max-replicas M] [--ray-address auto|ADDR]]

Every setting is checked, and the port bound, before the model loads, so a mistake (a port out of
range or in use, a negative cache size, a bad model path) is one `leapllm: error: ...` line and
exit status 2. SIGTERM or Ctrl-C drains: no new connections, requests in flight get
--shutdown-timeout seconds to finish, the rest are aborted, and the process exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from leapllm.cli.main import add_model_args, add_speculative_args, load_llm, speculative_kwargs


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)",
        description="Serve the model over an OpenAI-compatible HTTP API, batching concurrent requests.")
    add_model_args(p)
    add_speculative_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("LEAPLLM_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LEAPLLM_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the model file's name)")
    e = p.add_argument_group("encoders")
    e.add_argument("--embedding-model", metavar="FOLDER", default=None,
                   help="also serve /v1/embeddings with this encoder folder, or 'default' for all-MiniLM-L6-v2")
    e.add_argument("--embedding-int8", action="store_true", help="int8 weights and activations for the encoder")
    e.add_argument("--classifier", metavar="FOLDER", default=None,
                   help="also serve /v1/classify with a classifier trained by `leapllm classify train`")
    g = p.add_argument_group("engine")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once (default: 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens per engine step, decodes plus prefill chunks (default: 512)")
    g.add_argument("--kv-cache-gb", type=float, default=1.0, help="size of the KV cache pool in GB (default: 1.0)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="auto: the model's dtype; int8: one byte per value plus a scale per token and head "
                        "(~3.8x the tokens per GB in float32)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default: 16)")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not reuse KV blocks of shared prefixes")
    g.add_argument("--max-waiting", type=int, default=256,
                   help="requests that may wait for a slot; beyond that the server answers 503 (default: 256)")
    s = p.add_argument_group("scale-out (docs/scale-out.md)")
    s.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N processes (attention heads, MLP columns, vocabulary), started "
                        "here, or by torchrun across machines (default: 1)")
    s.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="run N engine replicas behind this endpoint on Ray Serve (needs pip install leapllm[ray])")
    s.add_argument("--max-replicas", type=int, default=None, metavar="M",
                   help="with --replicas N: let Ray Serve autoscale between N and M replicas on load")
    s.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --replicas: the Ray cluster to use (HOST:PORT or ray://HOST:PORT), or auto to start a "
                        "local Ray instance for this server (default: auto)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds requests in flight get to finish after SIGTERM; the rest are aborted "
                        "and answered with 503 (default: 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level; info logs one line per request (default: info)")
    p.set_defaults(func=cmd_serve)
    return p


def engine_config(args):
    from leapllm.engine.llm_engine import EngineConfig
    from leapllm.errors import InvalidRequestError

    if not 0 <= args.port <= 65535:
        raise InvalidRequestError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_waiting < 0:
        raise InvalidRequestError(f"--max-waiting must be at least 0, got {args.max_waiting}")
    if not args.shutdown_timeout >= 0:
        raise InvalidRequestError(f"--shutdown-timeout must be at least 0, got {args.shutdown_timeout}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise InvalidRequestError("--served-model-name must not be empty")
    if args.api_key is not None and not args.api_key:
        raise InvalidRequestError("--api-key must not be empty")
    if not args.kv_cache_gb > 0:  # EngineConfig checks it too, but names the setting differently
        raise InvalidRequestError(f"--kv-cache-gb must be positive, got {args.kv_cache_gb}")
    check_scale_out(args)
    if speculative_kwargs(args) and (args.replicas is not None or args.tensor_parallel > 1):
        raise InvalidRequestError("speculative decoding is not supported with --replicas or --tensor-parallel")
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          block_size=args.block_size, kv_cache_gb=args.kv_cache_gb,
                          enable_prefix_caching=not args.no_prefix_caching, kv_cache_dtype=args.kv_cache_dtype)
    config.validate()
    return config


def check_scale_out(args) -> None:
    """--tensor-parallel, --replicas and their companions, checked before anything loads."""
    from leapllm.errors import InvalidRequestError

    if args.tensor_parallel < 1:
        raise InvalidRequestError(f"--tensor-parallel must be at least 1, got {args.tensor_parallel}")
    if args.replicas is None:
        for name, value in (("--max-replicas", args.max_replicas), ("--ray-address", args.ray_address)):
            if value is not None:
                raise InvalidRequestError(f"{name} needs --replicas")
        return
    if args.replicas < 1:
        raise InvalidRequestError(f"--replicas must be at least 1, got {args.replicas}")
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        raise InvalidRequestError(f"--max-replicas ({args.max_replicas}) must be at least --replicas ({args.replicas})")
    if args.tensor_parallel > 1:
        raise InvalidRequestError("--replicas and --tensor-parallel cannot be combined: each replica is one process")
    if args.embedding_model is not None or args.classifier is not None:
        raise InvalidRequestError("--embedding-model and --classifier are not served by --replicas; run them in a "
                                  "separate leapllm serve")
    if args.ray_address is not None and not args.ray_address.strip():
        raise InvalidRequestError("--ray-address must not be empty (auto starts a local Ray instance)")
    args.ray_address = args.ray_address or "auto"
    from leapllm.serving.ray_replicas import ray_missing

    missing = ray_missing()
    if missing:
        raise InvalidRequestError(missing)


def load_serving_llm(args):
    """The model, split over --tensor-parallel processes when asked."""
    if args.tensor_parallel == 1:
        return load_llm(args)
    from leapllm.errors import InvalidRequestError
    from leapllm.llm import LLM

    if args.threads is not None and args.threads < 1:
        raise InvalidRequestError(f"--threads must be at least 1, got {args.threads}")
    return LLM(args.model, dtype=args.dtype, device=args.device, num_threads=args.threads,
               tensor_parallel=args.tensor_parallel)


def stop_on_rank_failure(message: str) -> None:
    """A tensor-parallel rank died: stop serving (SIGTERM drains, and the requests in flight fail at once)."""
    print(f"leapllm: {message}; stopping the server", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def default_model_name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def load_encoders(args):
    """The embedding model and classifier asked for, or None."""
    if args.embedding_model is None and args.classifier is None:
        return None
    from leapllm.encoders.embedder import Embedder
    from leapllm.encoders.embedding_batcher import EmbeddingBatcher
    from leapllm.serving.encoder_api import EncoderServing

    batcher = name = classifier = classifier_name = None
    if args.embedding_model is not None:
        path = None if args.embedding_model == "default" else args.embedding_model
        embedder = Embedder(path, device=args.device if args.device != "auto" else "cpu",
                            quantize="int8" if args.embedding_int8 else None)
        batcher, name = EmbeddingBatcher(embedder), embedder.name
    if args.classifier is not None:
        from leapllm.encoders.classifier import TextClassifier

        classifier = TextClassifier.load(args.classifier)
        classifier_name = Path(args.classifier).resolve().name
    return EncoderServing(batcher, name, classifier, classifier_name)


def cmd_serve(args) -> int:
    from leapllm.engine.async_engine import AsyncEngine
    from leapllm.engine.llm_engine import LLMEngine
    from leapllm.serving import create_app
    from leapllm.serving.runner import bind_socket, serve

    config = engine_config(args)
    if args.replicas is not None:
        from leapllm.serving.ray_replicas import serve_replicas

        return serve_replicas(args, config)
    if args.tensor_parallel > 1:
        from leapllm.distributed import torchrun_rank

        launched = torchrun_rank()
        if launched is not None and launched[0] != 0:
            load_serving_llm(args)  # a worker rank under torchrun: serves rank 0, then exits the process
            return 0
    sock = bind_socket(args.host, args.port)  # fail on a taken port before the slow model load
    group = None
    try:
        llm = load_serving_llm(args)
        group = getattr(llm.model, "group", None)  # the tensor-parallel group, if any
        if group is not None:
            group.on_failure(stop_on_rank_failure)
        config.speculative = llm.speculative  # --speculative / --draft-model, loaded next to the model
        engine = AsyncEngine(LLMEngine(llm.model, llm.tokenizer, config), max_waiting=args.max_waiting)
        name = args.served_model_name or default_model_name(Path(llm.path))
        app = create_app(engine, llm.tokenizer, name, llm.config.context_length, api_key=args.api_key,
                         shutdown_grace_s=args.shutdown_timeout, encoders=load_encoders(args))
        port = sock.getsockname()[1]  # the one picked, with --port 0
        host = f"[{args.host}]" if ":" in args.host else args.host
        tp = f", tensor-parallel over {args.tensor_parallel} ranks" if args.tensor_parallel > 1 else ""
        print(f"leapllm: serving {name} at http://{host}:{port}/v1 "
              f"(max {config.max_num_seqs} sequences, {engine.engine.allocator.num_blocks} KV blocks{tp}"
              f"{', API key required' if args.api_key else ''})", file=sys.stderr, flush=True)
        # uvicorn's hard limit comes after the engine's grace period and its aborts have been answered.
        started = serve(app, sock, on_shutdown=app.state.drain, log_level=args.log_level,
                        timeout_graceful_shutdown=args.shutdown_timeout + 10)
    finally:
        sock.close()
        if group is not None:
            group.close()
    if group is not None and group.failure is not None:
        print(f"leapllm: error: {group.failure}; the server stopped", file=sys.stderr, flush=True)
        return 1
    return 0 if started else 1
