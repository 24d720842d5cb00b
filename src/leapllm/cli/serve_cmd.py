"""`leapllm serve`: the OpenAI-compatible HTTP server.

    leapllm serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                  [--max-num-seqs 64] [--kv-cache-gb 1.0] ...
                  [--tensor-parallel N | --replicas N [--max-replicas M] [--ray-address auto|ADDR]]

Every setting is checked, and the port bound, before the model loads, so a mistake (a port out of
range or in use, a negative cache size, a bad model path) is one `leapllm: error: ...` line and
exit status 2. SIGTERM or Ctrl-C drains: no new connections, requests in flight get
--shutdown-timeout seconds to finish, the rest are aborted, and the process exits 0.

An encoder-decoder folder (T5, BART, mBART, MarianMT) is served on /v1/completions instead, each
prompt a source text (serving/seq2seq_serving.py); flags only the LLM server has are refused.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from leapllm.cli.args import (
    ServeSettings,
    add_model_args,
    add_server_args,
    add_speculative_args,
    serve_settings_from_args,
)
from leapllm.cli.common import llm_from_settings
from leapllm.config import ServerSettings
from leapllm.loading.default_model import default_model_name


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)",
        description="Serve the model over an OpenAI-compatible HTTP API, batching concurrent requests.")
    add_model_args(p)
    add_speculative_args(p)
    add_server_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def check_task_heads(server: ServerSettings) -> None:
    """The task-head flags name folders of their task (read before anything loads)."""
    from leapllm.errors import InvalidRequestError
    from leapllm.loading.encoder_loader import folder_task

    heads = {"--qa-model": (server.qa_model, "question-answering"),
             "--ner-model": (server.ner_model, "token-classification")}
    for flag, (path, task) in heads.items():
        if path is None:
            continue
        found = folder_task(path)
        if found != task:
            raise InvalidRequestError(f"{flag} {path}: not a {task} model folder (its config.json names "
                                      f"{found or 'no task head'})")


def stop_on_rank_failure(message: str) -> None:
    """A tensor-parallel rank died: stop serving (SIGTERM drains, and the requests in flight fail at once)."""
    print(f"leapllm: {message}; stopping the server", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def load_encoders(server: ServerSettings, device: str):
    """The embedding model, classifier and task heads asked for, or None."""
    qa_model, ner_model = server.qa_model, server.ner_model
    if server.embedding_model is None and server.classifier is None and qa_model is None and ner_model is None:
        return None
    from leapllm.encoders.embedder import Embedder
    from leapllm.encoders.embedding_batcher import EmbeddingBatcher
    from leapllm.serving.embeddings import EncoderServing

    batcher = name = classifier = classifier_name = None
    if server.embedding_model is not None:
        path = None if server.embedding_model == "default" else server.embedding_model
        embedder = Embedder(path, device=device if device != "auto" else "cpu",
                            quantize="int8" if server.embedding_int8 else None)
        batcher, name = EmbeddingBatcher(embedder), embedder.name
    heads_device = device if device != "auto" else "cpu"
    if server.classifier is not None:
        from leapllm.loading.encoder_loader import folder_task

        if folder_task(server.classifier) is not None:  # a fine-tuned Hugging Face head
            from leapllm.encoders.task_heads import load_task

            classifier = load_task(server.classifier, "text-classification", device=heads_device)
        else:
            from leapllm.encoders.classifier import TextClassifier

            classifier = TextClassifier.load(server.classifier)
        classifier_name = Path(server.classifier).resolve().name
    qa = ner = None
    if qa_model is not None or ner_model is not None:
        from leapllm.encoders.task_heads import load_task

        qa = load_task(qa_model, "question-answering", device=heads_device) if qa_model else None
        ner = load_task(ner_model, "token-classification", device=heads_device) if ner_model else None
    return EncoderServing(batcher, name, classifier, classifier_name, qa, ner)


def model_facts(llm) -> dict:
    """`leapllm info` for the dashboard, with the file's name instead of its local path."""
    facts = llm.info()
    facts["file"] = Path(facts.pop("path")).name
    return facts


def seq2seq_app(args, settings: ServeSettings):
    """The app of `leapllm serve --model ENCODER_DECODER_FOLDER`: the flags it cannot take are refused
    before the load; the engine flags (--max-num-seqs: running sequences, beams included; the KV
    cache's) are the LLM server's."""
    from leapllm.engine.seq2seq_lm import Seq2SeqLM
    from leapllm.errors import InvalidRequestError
    from leapllm.serving.seq2seq_serving import create_seq2seq_app

    server, model, config, speculative = settings
    refused = {"--replicas": server.replicas is not None, "--tensor-parallel": model.tensor_parallel > 1,
               "--speculative / --draft-model": bool(speculative), "--embedding-model": server.embedding_model,
               "--classifier": server.classifier, "--qa-model": server.qa_model, "--ner-model": server.ner_model,
               "--reports": server.reports}
    for flag, given in refused.items():
        if given:
            raise InvalidRequestError(f"{flag} is not supported with an encoder-decoder model ({model.model})")
    lm = Seq2SeqLM(model.model, dtype=model.dtype, device=model.device, num_threads=model.threads,
                   engine_config=config)
    name = server.served_model_name or default_model_name(Path(lm.path))
    return create_seq2seq_app(lm, name, server.api_key, max_waiting=server.max_waiting,
                              shutdown_grace_s=server.shutdown_timeout, max_request_bytes=server.max_request_bytes)


def serve_seq2seq(args, settings: ServeSettings) -> int:
    from leapllm.serving.runner import bind_socket, serve

    server = settings.server
    sock = bind_socket(server.host, server.port)  # fail on a taken port before the model load
    try:
        app = seq2seq_app(args, settings)
        port = sock.getsockname()[1]
        host = f"[{server.host}]" if ":" in server.host else server.host
        print(f"leapllm: serving {app.state.model_name} at http://{host}:{port}/v1 (encoder-decoder on "
              f"/v1/completions, batches of at most {settings.engine.max_num_seqs} sequences"
              f"{', API key required' if server.api_key else ''})", file=sys.stderr, flush=True)
        started = serve(app, sock, on_shutdown=app.state.drain, log_level=server.log_level,
                        timeout_graceful_shutdown=server.shutdown_timeout + 10)
    finally:
        sock.close()
    return 0 if started else 1


def cmd_serve(args) -> int:
    from leapllm.engine.async_engine import AsyncEngine
    from leapllm.engine.llm_engine import LLMEngine
    from leapllm.loading.seq2seq_loader import is_seq2seq_folder
    from leapllm.serving import create_app
    from leapllm.serving.runner import bind_socket, serve

    settings = serve_settings_from_args(args)
    server, model, config, speculative = settings
    if model.model is not None and is_seq2seq_folder(model.model):
        return serve_seq2seq(args, settings)
    check_task_heads(server)
    if server.replicas is not None:
        from leapllm.serving.ray_replicas import serve_replicas

        return serve_replicas(server, model, config)
    if model.tensor_parallel > 1:
        from leapllm.distributed import torchrun_rank

        launched = torchrun_rank()
        if launched is not None and launched[0] != 0:
            llm_from_settings(model)  # a worker rank under torchrun: serves rank 0, then exits the process
            return 0
    sock = bind_socket(server.host, server.port)  # fail on a taken port before the slow model load
    group = None
    try:
        llm = llm_from_settings(model, speculative)
        group = getattr(llm.model, "group", None)  # the tensor-parallel group, if any
        if group is not None:
            group.on_failure(stop_on_rank_failure)
        config.speculative = llm.speculative  # --speculative / --draft-model, loaded next to the model
        engine = AsyncEngine(LLMEngine(llm.model, llm.tokenizer, config), max_waiting=server.max_waiting)
        name = server.served_model_name or default_model_name(Path(llm.path))
        encoders = load_encoders(server, model.device)
        app = create_app(engine, llm.tokenizer, name, llm.config.context_length, api_key=server.api_key,
                         shutdown_grace_s=server.shutdown_timeout, encoders=encoders,
                         max_request_bytes=server.max_request_bytes, model_facts=model_facts(llm),
                         reports_dir=server.reports)
        port = sock.getsockname()[1]  # the one picked, with --port 0
        host = f"[{server.host}]" if ":" in server.host else server.host
        tp = f", tensor-parallel over {model.tensor_parallel} ranks" if model.tensor_parallel > 1 else ""
        print(f"leapllm: serving {name} at http://{host}:{port}/v1, chat page at http://{host}:{port}/ "
              f"(max {config.max_num_seqs} sequences, {engine.engine.allocator.num_blocks} KV blocks{tp}"
              f"{', API key required' if server.api_key else ''})", file=sys.stderr, flush=True)
        # uvicorn's hard limit comes after the engine's grace period and its aborts have been answered.
        started = serve(app, sock, on_shutdown=app.state.drain, log_level=server.log_level,
                        timeout_graceful_shutdown=server.shutdown_timeout + 10)
    finally:
        sock.close()
        if group is not None:
            group.close()
    if group is not None and group.failure is not None:
        print(f"leapllm: error: {group.failure}; the server stopped", file=sys.stderr, flush=True)
        return 1
    return 0 if started else 1
