"""`leapllm serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the async engine.

    from leapllm.serving import create_app
    app = create_app(async_engine, tokenizer, model_name="smollm2", context_length=8192)

app.py builds the app; protocol.py holds the request/response models and errors.py the OpenAI
error JSON; completions.py and chat.py the two generation endpoints over what they share
(generation.py), with logprobs.py and streaming.py (server-sent events); embeddings.py the
encoder endpoints (embeddings, classification, QA, NER); seq2seq_serving.py the app that serves an
encoder-decoder on /v1/completions instead; web.py the chat page and dashboard; auth.py the API key, disconnect.py clients that go away, metrics.py the
Prometheus metrics, runner.py the uvicorn plumbing (socket, signals, threads) and
ray_replicas.py `--replicas` on Ray Serve.
"""

from leapllm.serving.app import create_app

__all__ = ["create_app"]
