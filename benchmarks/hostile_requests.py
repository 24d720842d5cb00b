"""A concurrent stream and /health while hostile requests arrive: the longest prompt still worth
tokenizing (then refused as too long for the context), three times, and a 9 MiB body (413).

    .venv/bin/python benchmarks/hostile_requests.py

Prints the hostile requests' status codes, the stream's inter-token gaps (p50, max) and the slowest
/health answer, alone and under the hostile requests. Goal (hostile-input issue): each grows by at
most 100 ms.
"""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx

from leapllm.config import EngineConfig
from leapllm.engine.async_engine import AsyncEngine
from leapllm.engine.llm_engine import LLMEngine
from leapllm.llm import LLM
from leapllm.serving import create_app
from leapllm.serving.runner import ServerThread


def stream_gaps(url: str, tokens: int = 200) -> list[float]:
    """Seconds between the stream's chunks."""
    gaps, last = [], None
    body = {"prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
    return gaps


def poll_health(url: str, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        httpx.get(f"{url}/health", timeout=60)
        out.append(time.perf_counter() - start)
        time.sleep(0.02)


def main() -> None:
    llm = LLM()
    engine = AsyncEngine(LLMEngine(llm.model, llm.tokenizer, EngineConfig(max_num_seqs=8, kv_cache_gb=0.25)),
                         max_waiting=16)
    server = ServerThread(create_app(engine, llm.tokenizer, "m", llm.config.context_length)).start()
    url = server.url
    stream_gaps(url, 8)  # warm-up

    def measure(hostile=None) -> tuple[list[float], list[float]]:
        health, stop = [], threading.Event()
        poller = threading.Thread(target=poll_health, args=(url, stop, health))
        poller.start()
        attacker = threading.Thread(target=hostile) if hostile else None
        if attacker:
            attacker.start()
        gaps = stream_gaps(url)
        if attacker:
            attacker.join()
        stop.set()
        poller.join()
        return gaps, health

    chars = llm.config.context_length * llm.tokenizer.max_token_chars - 10
    long_prompt = ("The quick brown fox jumps over the lazy dog. " * (chars // 45 + 1))[:chars]
    codes = []

    def hostile():
        for _ in range(3):
            codes.append(httpx.post(f"{url}/v1/completions", json={"prompt": long_prompt, "max_tokens": 4},
                                    timeout=300).status_code)
        big = json.dumps({"prompt": "x" * (9 * 2**20)})
        codes.append(httpx.post(f"{url}/v1/completions", content=big, timeout=300,
                                headers={"content-type": "application/json"}).status_code)

    base_gaps, base_health = measure()
    gaps, health = measure(hostile)
    server.stop()
    print(f"hostile requests answered {codes}")
    print(f"stream gap ms, p50 / max: alone {1000 * statistics.median(base_gaps):.1f} / {1000 * max(base_gaps):.1f}, "
          f"under attack {1000 * statistics.median(gaps):.1f} / {1000 * max(gaps):.1f}")
    print(f"slowest /health ms: alone {1000 * max(base_health):.1f}, under attack {1000 * max(health):.1f}")


if __name__ == "__main__":
    main()
