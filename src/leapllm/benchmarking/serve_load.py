"""`leapllm bench serve`: a load generator for an OpenAI-compatible server, and the batch-1 baseline.

For each concurrency level, N clients stream completions (fixed prompt and output lengths,
optionally arriving at a Poisson request rate) and we record per request the time to first
token (TTFT) and the time per output token after it (TPOT); the level's throughput is output
tokens over wall time. Next to it, in the same run and on the same idle machine, the core
single-sequence engine (`LLM.run`: contiguous KV cache, one request at a time) serves the same
requests, which is what a server without batching would do.

Without --url the command starts `leapllm serve` itself on a free loopback port and stops it
(SIGTERM) at the end.

With --structured json-schema every level runs twice, on distinct prompts of the same length: plain,
then with each request held to a JSON schema (`guided_json`) that cannot be complete within the
output length, so both runs produce the same number of tokens. The constrained rows report their
throughput and TTFT against the plain ones; the first compilation (which also builds the grammar
engine's view of the vocabulary) and the compilation of a new schema are timed on their own first.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from leapllm.errors import InvalidRequestError


@dataclass
class LoadSettings:
    concurrency: list[int]
    prompt_len: int = 128
    output_len: int = 128
    num_requests: int | None = None  # per level; default: 2 per client, at least 4
    request_rate: float = float("inf")  # requests/s per level (Poisson arrivals); inf = all at once
    seed: int = 0
    structured: str | None = None  # "json-schema": each level again with a JSON schema

    def validate(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise InvalidRequestError("--concurrency needs positive integers, e.g. 1,8,32")
        if self.prompt_len < 1 or self.output_len < 1:
            raise InvalidRequestError("--prompt-len and --output-len must be at least 1")
        if self.num_requests is not None and self.num_requests < 1:
            raise InvalidRequestError("--num-requests must be at least 1")
        if not self.request_rate > 0:
            raise InvalidRequestError("--request-rate must be positive (inf: all requests at once)")
        if self.structured not in (None, "json-schema"):
            raise InvalidRequestError(f"--structured takes json-schema, got {self.structured!r}")

    def requests_for(self, concurrency: int) -> int:
        return self.num_requests or max(4, 2 * concurrency)


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    output_tokens: int = 0
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class LevelResult:
    name: str
    concurrency: int
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict:
        ok = [r for r in self.results if r.ok]
        ttft = [r.ttft_s * 1000 for r in ok]
        tpot = [r.tpot_s * 1000 for r in ok if r.tpot_s is not None]
        out_tokens = sum(r.output_tokens for r in ok)

        def pct(values, q):
            return float(np.percentile(values, q)) if values else None

        return {
            "system": self.name, "concurrency": self.concurrency, "requests": len(self.results),
            "failed": len(self.results) - len(ok), "output_tokens": out_tokens, "wall_s": self.wall_s,
            "output_tokens_per_s": out_tokens / self.wall_s if self.wall_s > 0 else 0.0,
            "requests_per_s": len(ok) / self.wall_s if self.wall_s > 0 else 0.0,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99),
            "errors": sorted({r.error for r in self.results if not r.ok})[:5],
        }


def bench_schema(min_items: int) -> dict:
    """A list of at least `min_items` person records: a JSON schema that cannot be complete within
    a benchmark's output length (each record takes some 15 tokens), so constrained requests run to
    max_tokens like plain ones."""
    person = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
              "properties": {"name": {"type": "string", "maxLength": 24},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120},
                             "city": {"type": "string", "maxLength": 24}}}
    return {"type": "array", "items": person, "minItems": min_items}


def make_prompts(token_ids: list[int], count: int, prompt_len: int, seed: int) -> list[list[int]]:
    """`count` distinct prompts of exactly prompt_len tokens, cut at random offsets of a real text
    (distinct so that the prefix cache does not turn the benchmark into a cache test)."""
    if len(token_ids) < prompt_len + count:
        raise InvalidRequestError(f"the reference text has {len(token_ids)} tokens; too few for {count} prompts "
                                  f"of {prompt_len}")
    rng = random.Random(seed)
    starts = rng.sample(range(len(token_ids) - prompt_len), count)
    return [token_ids[s:s + prompt_len] for s in starts]


# -- the HTTP side ---------------------------------------------------------------------------------
async def stream_one(client, url: str, model: str, prompt: list[int], output_len: int,
                     schema: dict | None = None) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if schema is not None:
        body["guided_json"] = schema
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")[:200]
                return RequestResult(False, error=f"HTTP {resp.status_code}: {text}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("choices") and first is None:
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as exc:  # a refused connection, a reset: count it, keep the load going
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if first is None or tokens == 0:
        return RequestResult(False, error="the stream carried no tokens or no usage")
    return RequestResult(True, first - start, end - start, tokens)


async def run_level(url: str, model: str, prompts: list[list[int]], concurrency: int, settings: LoadSettings,
                    timeout: float, schema: dict | None = None) -> LevelResult:
    import httpx

    level = LevelResult("leapllm serve" + (", JSON schema" if schema is not None else ""), concurrency)
    rng = random.Random(settings.seed + concurrency)
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def one(prompt):
            async with gate:
                level.results.append(await stream_one(client, url, model, prompt, settings.output_len, schema))

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            if settings.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(settings.request_rate))
        await asyncio.gather(*tasks)
        level.wall_s = time.perf_counter() - start
    return level


# -- the server we start ourselves -----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`leapllm serve` in a child process on a free loopback port."""

    def __init__(self, serve_args: list[str], startup_timeout: float = 300.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "leapllm", "serve", "--host", "127.0.0.1", "--port", str(self.port), *serve_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "TQDM_DISABLE": "1"})
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().strip().splitlines()
                raise InvalidRequestError(f"leapllm serve exited with {self.proc.returncode}: "
                                          f"{err[-1] if err else 'no message'}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise InvalidRequestError(f"leapllm serve did not answer /health within {timeout:.0f} s")

    def model_name(self) -> str:
        import httpx

        return httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]["id"]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# -- the batch-1 baseline ----------------------------------------------------------------------------
def run_batch1_baseline(llm, prompts: list[list[int]], output_len: int) -> LevelResult:
    """The core engine serving the same requests one after another (what no batching gives)."""
    from leapllm.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.run(prompts[0][:16], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    level = LevelResult("core engine, batch 1", 1)
    start = time.perf_counter()
    for prompt in prompts:
        out = llm.run(prompt, params)
        t = out.timings
        level.results.append(RequestResult(True, t["time_to_first_token_s"], t["total_s"], len(out.token_ids)))
    level.wall_s = time.perf_counter() - start
    return level


# -- one run: baseline, then every concurrency level against one server --------------------------------
def log(message: str) -> None:
    print(f"[bench serve] {message}", file=sys.stderr, flush=True)


def run_serve_bench(settings: LoadSettings, *, model: str | None, url: str | None, serve_args: list[str],
                    baseline: bool, dtype: str, threads: int | None, timeout: float,
                    command: str | None = None) -> dict:
    """Measure the batch-1 baseline (unless --url or --no-baseline) and each concurrency level."""
    import torch

    from leapllm.llm import LLM
    from leapllm.profiling.machine import device_name
    from leapllm.reference_text import reference_token_ids

    settings.validate()
    total = sum(settings.requests_for(c) for c in settings.concurrency) * (2 if settings.structured else 1)
    log("loading the model for prompts" + (" and the batch-1 baseline" if baseline else ""))
    llm = LLM(model, dtype=dtype, device="cpu", num_threads=threads)
    text_ids = reference_token_ids(llm.tokenizer, settings.prompt_len * 4 + total + 64)
    prompts = make_prompts(text_ids, total + 1, settings.prompt_len, settings.seed)
    warmup, prompts = prompts[0], prompts[1:]
    levels: list[LevelResult] = []
    if baseline:
        n = min(4, settings.requests_for(settings.concurrency[0]))
        log(f"batch-1 baseline: {n} requests of {settings.prompt_len} + {settings.output_len} tokens, one at a time")
        levels.append(run_batch1_baseline(llm, prompts[:n], settings.output_len))
    del llm  # free the memory before the server loads its own copy

    server = None
    if url is None:
        log("starting leapllm serve")
        server = ServerProcess(serve_args)
        url = server.url
    try:
        import httpx

        served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        asyncio.run(run_level(url, served, [warmup], 1, LoadSettings([1], settings.prompt_len, 8), timeout))
        schema = bench_schema(settings.output_len) if settings.structured else None
        compile_times = None
        if schema is not None:
            compile_times = asyncio.run(time_first_compiles(url, served, warmup, settings, schema, timeout))
        offset = 0
        for c in settings.concurrency:
            n = settings.requests_for(c)
            for level_schema in ([None, schema] if schema is not None else [None]):
                log(f"{c} concurrent clients, {n} requests" + (", JSON schema" if level_schema else ""))
                levels.append(asyncio.run(run_level(url, served, prompts[offset:offset + n], c, settings, timeout,
                                                    level_schema)))
                offset += n
    finally:
        exit_code = server.stop() if server is not None else None

    rows = [lv.summary() for lv in levels]
    base = next((r for r in rows if r["system"].startswith("core")), None)
    for r in rows:
        r["throughput_vs_batch1"] = (r["output_tokens_per_s"] / base["output_tokens_per_s"]
                                     if base and base["output_tokens_per_s"] else None)
    for plain, constrained in zip(rows, rows[1:]):
        if constrained["system"].endswith("JSON schema") and plain["concurrency"] == constrained["concurrency"]:
            constrained["throughput_vs_plain"] = (constrained["output_tokens_per_s"] / plain["output_tokens_per_s"]
                                                  if plain["output_tokens_per_s"] else None)
            if constrained["ttft_ms_p50"] is not None and plain["ttft_ms_p50"] is not None:
                constrained["ttft_ms_p50_vs_plain"] = constrained["ttft_ms_p50"] - plain["ttft_ms_p50"]
    return {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "url": url if server is None else None,
        "machine": {"cpu": device_name(torch.device("cpu")), "cores": os.cpu_count()},
        "settings": {"prompt_len": settings.prompt_len, "output_len": settings.output_len,
                     "request_rate": settings.request_rate, "concurrency": settings.concurrency,
                     "serve_args": serve_args if server is not None else None},
        "server_exit_code": exit_code, "levels": rows, "structured": settings.structured,
        "first_compile": compile_times,
    }


async def time_first_compiles(url: str, model: str, prompt: list[int], settings: LoadSettings, schema: dict,
                              timeout: float, repeats: int = 7) -> dict:
    """TTFT of one request alone: with the server's first schema (its compile also builds the grammar
    engine's view of the vocabulary), with a second new schema, and the median of `repeats` requests
    plain and with that schema cached, interleaved."""
    import httpx

    async with httpx.AsyncClient(timeout=timeout) as client:
        async def ttft(s):
            r = await stream_one(client, url, model, prompt, 4, s)
            return r.ttft_s * 1000 if r.ok else float("nan")

        out = {"first_schema_ttft_ms": await ttft(schema)}
        other = bench_schema(settings.output_len + 1)
        out["new_schema_ttft_ms"] = await ttft(other)
        plain, cached = [], []
        for _ in range(repeats):
            plain.append(await ttft(None))
            cached.append(await ttft(other))
        out["plain_ttft_ms"] = float(np.median(plain))
        out["cached_schema_ttft_ms"] = float(np.median(cached))
    return out


def _fmt(value, spec) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["system", "clients", "requests", "output tok/s", "x batch-1", "TTFT p50 ms", "TTFT p99 ms",
              "TPOT p50 ms", "TPOT p99 ms", "failed"]
    structured = bool(report.get("structured"))
    if structured:
        header += ["x plain", "TTFT p50 vs plain ms"]
    rows = []
    for r in report["levels"]:
        row = [r["system"], str(r["concurrency"]), str(r["requests"]), _fmt(r["output_tokens_per_s"], ".1f"),
               _fmt(r["throughput_vs_batch1"], ".2f"), _fmt(r["ttft_ms_p50"], ".0f"), _fmt(r["ttft_ms_p99"], ".0f"),
               _fmt(r["tpot_ms_p50"], ".1f"), _fmt(r["tpot_ms_p99"], ".1f"), str(r["failed"])]
        if structured:
            row += [_fmt(r.get("throughput_vs_plain"), ".2f"), _fmt(r.get("ttft_ms_p50_vs_plain"), "+.1f")]
        rows.append(row)
    return header, rows


def compile_line(report: dict) -> str | None:
    c = report.get("first_compile")
    if not c:
        return None
    return ("One request alone, TTFT in ms: the first schema {1} (compiles it and builds the vocabulary view), "
            "a new schema {2}; median of 7, plain {0}, that schema cached {3}.").format(*(_fmt(c[k], ".1f") for k in (
                "plain_ttft_ms", "first_schema_ttft_ms", "new_schema_ttft_ms", "cached_schema_ttft_ms")))


def markdown(report: dict) -> str:
    s = report["settings"]
    header, rows = table_rows(report)
    lines = [f"# leapllm bench serve ({report['date']})", "",
             f"{report['machine']['cpu']}, {report['machine']['cores']} cores; prompts of {s['prompt_len']} tokens, "
             f"{s['output_len']} output tokens each (greedy, ignore_eos), request rate {s['request_rate']}.", ""]
    if report.get("command"):
        lines += [f"Command: `{report['command']}`", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if compile_line(report):
        lines += ["", compile_line(report)]
    return "\n".join(lines) + "\n"


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(report)
    table = Table(title="leapllm bench serve")
    for h in header:
        table.add_column(h, justify="left" if h == "system" else "right")
    for r in rows:
        table.add_row(*r)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    if compile_line(report):
        print(compile_line(report))
    for r in report["levels"]:
        for e in r["errors"]:
            print(f"  {r['system']} x{r['concurrency']}: {e}", file=sys.stderr)
