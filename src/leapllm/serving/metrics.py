"""Prometheus metrics of one server, on its own CollectorRegistry (no global state).

Names follow vLLM's (`vllm:num_requests_running` is `leapllm:num_requests_running` here), so
existing dashboards need only the prefix changed. Two kinds:

- read from the engine at scrape time (a custom collector over `AsyncEngine.stats()`): requests
  running and waiting, KV blocks used and total, prompt and generated token counters, prefix
  cache and preemption counters. They are the engine's own counts, never a second bookkeeping.
- observed by the server as requests finish: time to first token, time per output token, end to
  end latency, and finished requests by finish reason (and aborted ones).
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from leapllm.engine.request import RequestOutput

PREFIX = "leapllm:"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0)


# metric name (after the prefix) -> (key in AsyncEngine.stats(), help text)
ENGINE_GAUGES = {
    "num_requests_running": ("num_running", "Requests running on the engine (in the running batch)."),
    "num_requests_waiting": ("num_waiting", "Requests waiting to be scheduled."),
    "num_requests_in_flight": ("num_in_flight", "Requests the server has handed to the engine and not finished."),
    "kv_cache_blocks_used": ("kv_blocks_used", "KV-cache blocks in use."),
    "kv_cache_blocks_total": ("kv_blocks_total", "KV-cache blocks in the pool."),
}
ENGINE_COUNTERS = {
    "prompt_tokens": ("prompt_tokens", "Prompt tokens admitted."),
    "generation_tokens": ("generated_tokens", "Tokens generated."),
    "prefix_cache_hits": ("prefix_cache_hit_tokens", "Prompt tokens served by the prefix cache."),
    "prefix_cache_queries": ("prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache."),
    "num_preemptions": ("num_preemptions", "Sequences preempted (their KV blocks freed, to recompute later)."),
    "spec_decode_num_draft_tokens": ("spec_decode_draft_tokens", "Tokens proposed by speculative decoding."),
    "spec_decode_num_accepted_tokens": ("spec_decode_accepted_tokens",
                                        "Proposed tokens the target kept (speculative decoding)."),
    "spec_decode_num_steps": ("spec_decode_steps", "Verification steps of speculative decoding."),
}


class EngineStatsCollector(Collector):
    """Gauges and counters read from the engine's stats() on every scrape."""

    def __init__(self, async_engine, model_name: str):
        self.async_engine = async_engine
        self.model_name = model_name

    def collect(self):
        stats = self.async_engine.stats()
        label = [self.model_name]
        for name, (key, doc) in ENGINE_GAUGES.items():
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric(label, stats[key])
            yield g
        usage = GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).",
                                  labels=["model_name"])
        usage.add_metric(label, stats["kv_blocks_used"] / max(stats["kv_blocks_total"], 1))
        yield usage
        rate = GaugeMetricFamily(PREFIX + "spec_decode_acceptance_rate",
                                 "Fraction of proposed tokens kept since the start (0 without speculation).",
                                 labels=["model_name"])
        rate.add_metric(label, stats["spec_decode_accepted_tokens"] / max(stats["spec_decode_draft_tokens"], 1))
        yield rate
        for name, (key, doc) in ENGINE_COUNTERS.items():
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])  # exposed as NAME_total
            c.add_metric(label, stats[key])
            yield c


class ServerMetrics:
    def __init__(self, async_engine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(async_engine, model_name))
        self.model_name = model_name
        labels = ["model_name"]
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time from arrival to the first generated token.", labels,
            buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.time_per_output_token = Histogram(
            PREFIX + "time_per_output_token_seconds", "Mean time between output tokens of a finished request.",
            labels, buckets=TPOT_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last token of a finished request.",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.request_success = Counter(
            PREFIX + "request_success", "Requests (sequences) that finished, by finish reason.",
            labels + ["finished_reason"], registry=self.registry)
        self.request_aborted = Counter(
            PREFIX + "request_aborted", "Requests (sequences) aborted before finishing: the client went away, "
            "or the server shut down.", labels, registry=self.registry).labels(model_name)
        for reason in ("stop", "length"):  # expose both series from the start, at 0
            self.request_success.labels(model_name, reason)
        # (finish time, TTFT, TPOT or None) of recently finished requests, for the dashboard's
        # percentiles (the histograms' buckets are too coarse for them).
        self.recent: deque[tuple[float, float, float | None]] = deque(maxlen=4096)

    def observe_finished(self, out: RequestOutput) -> None:
        """Record one finished sequence from its last output."""
        if out.finish_reason == "abort":
            self.request_aborted.inc()
            return
        now = time.perf_counter()  # the engine's timestamps are perf_counter() too
        self.request_success.labels(self.model_name, out.finish_reason).inc()
        self.e2e_latency.observe(now - out.arrival_time)
        if out.first_token_time is not None:
            ttft, tpot = out.first_token_time - out.arrival_time, None
            self.time_to_first_token.observe(ttft)
            if out.num_output_tokens > 1:
                tpot = (now - out.first_token_time) / (out.num_output_tokens - 1)
                self.time_per_output_token.observe(tpot)
            self.recent.append((time.time(), ttft, tpot))

    def recent_latency(self, window_s: float = 60.0) -> dict:
        """TTFT and TPOT percentiles (seconds; None without data) of the requests finished in the last window_s."""
        since = time.time() - window_s
        recent = [r for r in list(self.recent) if r[0] >= since]
        out = {"window_s": window_s, "requests": len(recent)}
        for name, values in (("ttft", [r[1] for r in recent]), ("tpot", [r[2] for r in recent if r[2] is not None])):
            values.sort()
            out[name] = {f"p{q}": values[min(len(values) - 1, int(q / 100 * len(values)))] if values else None
                         for q in (50, 90, 99)}
        return out

    def observe_aborted(self, count: int = 1) -> None:
        self.request_aborted.inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
