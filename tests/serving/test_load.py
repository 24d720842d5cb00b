"""Concurrency and client disconnects: many streams at once, aborted requests give their KV blocks
back, and after any mix of traffic the engine is empty again."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx

from tests.serving.conftest import MODEL_NAME, read_metrics

LONG = {"model": MODEL_NAME, "prompt": "Write a long story about a dragon.", "max_tokens": 1000,
        "temperature": 0, "ignore_eos": True}


def aborted_total(url: str) -> float:
    return read_metrics(url)[("leapllm:request_aborted_total", ())]


def wait_until(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_32_concurrent_streams_all_complete_with_usage(server, llm):
    prompts = [f"Fact number {i} about the ocean:" for i in range(32)]

    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0.7,
                                                 seed=len(prompt), stream=True, stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            else:
                usage = chunk.usage
        return text, finish, usage

    async def main():
        client = server.async_openai()
        try:
            return await asyncio.gather(*(one(client, p) for p in prompts))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 32
    for prompt, (text, finish, usage) in zip(prompts, results):
        assert finish in ("stop", "length")
        assert usage.prompt_tokens == len(llm.tokenizer.encode(prompt))
        assert 1 <= usage.completion_tokens <= 8 and (finish == "stop" or usage.completion_tokens == 8)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert server.wait_idle()["kv_blocks_used"] == 0


def read_chunks_then_close(url: str, body: dict, count: int) -> list[dict]:
    """Open a stream, read `count` chunks, close the connection."""
    chunks = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(json.loads(line[len("data: "):]))
                if len(chunks) == count:
                    break
    return chunks


def test_stream_disconnect_aborts_request_and_frees_blocks(server):
    aborted_before = aborted_total(server.url)
    generated_before = server.stats()["generated_tokens"]
    chunks = read_chunks_then_close(server.url, LONG, 2)
    assert len(chunks) == 2 and chunks[-1]["choices"][0]["finish_reason"] is None
    assert wait_until(lambda: aborted_total(server.url) == aborted_before + 1)
    stats = server.wait_idle()
    assert stats["kv_blocks_used"] == 0 and stats["num_in_flight"] == 0
    assert stats["generated_tokens"] - generated_before < LONG["max_tokens"]
    m = read_metrics(server.url)
    assert m[("leapllm:kv_cache_blocks_used", ())] == 0 and m[("leapllm:num_requests_running", ())] == 0


def test_non_stream_disconnect_aborts_request_and_frees_blocks(server):
    """A plain (non-streaming) request whose client hangs up while it is generating."""
    aborted_before = aborted_total(server.url)
    generated_before = server.stats()["generated_tokens"]
    body = json.dumps(LONG).encode()
    sock = socket.create_connection(("127.0.0.1", server.thread.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert wait_until(lambda: server.stats()["generated_tokens"] > generated_before)  # it is generating
    sock.close()
    assert wait_until(lambda: aborted_total(server.url) == aborted_before + 1)
    stats = server.wait_idle()
    assert stats["kv_blocks_used"] == 0 and stats["num_in_flight"] == 0
    assert stats["generated_tokens"] - generated_before < LONG["max_tokens"]


def test_mixed_load_with_disconnects_leaves_no_kv_blocks_in_use(server):
    client = server.openai()
    results: dict[str, object] = {}

    def run(name, fn):
        try:
            results[name] = fn()
        except Exception as exc:  # reported by the asserts below
            results[name] = exc

    jobs = {
        **{f"aborted-{i}": lambda i=i: read_chunks_then_close(server.url, {**LONG, "seed": i}, 1 + i)
           for i in range(3)},
        **{f"plain-{i}": lambda i=i: client.completions.create(
            model=MODEL_NAME, prompt=f"Tell me about number {i}.", max_tokens=12, temperature=0.8, seed=i)
           for i in range(3)},
        **{f"stop-{i}": lambda: client.completions.create(
            model=MODEL_NAME, prompt="The capital of France is", max_tokens=12, temperature=0, stop=["."])
           for i in range(2)},
        "chat-stream": lambda: list(client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=10,
            temperature=0, stream=True)),
        "n-3": lambda: client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=6, n=3, seed=5),
    }
    threads = [threading.Thread(target=run, args=(name, fn)) for name, fn in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for name, result in results.items():
        assert not isinstance(result, Exception), (name, result)
    assert set(results) == set(jobs)
    for i in range(3):
        assert len(results[f"aborted-{i}"]) == 1 + i
        assert results[f"plain-{i}"].choices[0].finish_reason in ("stop", "length")
    for i in range(2):
        assert results[f"stop-{i}"].choices[0].text == " Paris"
    assert results["chat-stream"][-1].choices[0].finish_reason in ("stop", "length")
    assert [c.index for c in results["n-3"].choices] == [0, 1, 2]
    stats = server.wait_idle()
    assert stats["kv_blocks_used"] == 0 and stats["num_in_flight"] == 0 and stats["num_running"] == 0
