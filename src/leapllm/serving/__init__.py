"""`leapllm serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the async engine.

    from leapllm.serving import create_app
    app = create_app(async_engine, tokenizer, model_name="smollm2", context_length=8192)

protocol.py holds the request/response models, openai_server.py the app and its handlers,
metrics.py the Prometheus metrics, runner.py the uvicorn plumbing (socket, signals, threads).
"""

from leapllm.serving.openai_server import create_app

__all__ = ["create_app"]
