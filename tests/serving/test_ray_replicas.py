"""`leapllm serve --replicas 2` on a local Ray instance, over loopback: two engine replicas behind
one OpenAI endpoint serve concurrent requests through the openai client, and a replica killed in
the middle of requests fails them promptly, is replaced by Ray, and the endpoint keeps answering.

One server (and so one Ray instance) serves the whole module: Ray's start and two model loads
take about half a minute on 2 cores. The settings checks at the end need no Ray at all.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from leapllm import SamplingParams
from leapllm.config import EngineConfig
from leapllm.serving.ray_replicas import (
    REPLICA_HEADER,
    REPLICA_PID_HEADER,
    ReplicaSettings,
    deployment_options,
)
from tests.cli_helpers import assert_one_line_error
from tests.serving.test_serve_cli import ServeProcess

requires_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                  reason="needs the ray extra: pip install leapllm[ray]")
MODEL = "smollm2"


@pytest.fixture(scope="module")
def replicas():
    server = ServeProcess("--replicas", "2", "--ray-address", "auto", "--dtype", "float32", "--device", "cpu",
                          "--threads", "1", "--max-num-seqs", "16", "--kv-cache-gb", "0.05",
                          "--served-model-name", MODEL, "--shutdown-timeout", "5")
    try:
        server.wait_healthy(timeout=600)
        yield server
        server.proc.send_signal(signal.SIGTERM)  # undeploys and stops the local Ray instance
        assert server.proc.wait(120) == 0, "".join(server.stderr)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, prompt: str, max_tokens: int = 12, **extra) -> tuple[str, str]:
    """(replica that answered, completion text)."""
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                      temperature=0, **extra)
    return raw.headers[REPLICA_HEADER], raw.parse().choices[0].text


@pytest.mark.slow
@requires_ray
def test_two_replicas_serve_concurrent_requests_through_the_openai_client(replicas, llm):
    client = client_of(replicas)
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(12)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: ask(client, p), prompts))
    want = [o.text for o in llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0))]
    assert [text for _, text in results] == want
    assert len({replica for replica, _ in results}) == 2  # Ray spread them over both replicas
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


@pytest.mark.slow
@requires_ray
def test_a_killed_replica_fails_its_requests_promptly_and_ray_replaces_it(replicas):
    client = client_of(replicas)

    def request(i, max_tokens=8):
        try:
            return "ok", ask(client, f"Story number {i}:", max_tokens=max_tokens, extra_body={"ignore_eos": True})[0]
        except openai.APIStatusError as exc:
            return "error", exc.status_code

    with ThreadPoolExecutor(8) as pool:
        in_flight = [pool.submit(request, i, 100) for i in range(4)]
        time.sleep(1.0)
        body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{replicas.url}/v1/completions", json=body, timeout=120) as stream:
            victim, pid = stream.headers[REPLICA_HEADER], int(stream.headers[REPLICA_PID_HEADER])
            killed = None
            # The proxy cuts the stream (the events so far were already sent with a 200), not left hanging.
            with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                for i, _ in enumerate(stream.iter_lines()):
                    if i == 2:
                        os.kill(pid, signal.SIGKILL)
                        killed = time.monotonic()
            assert killed is not None and time.monotonic() - killed < 30
        # Requests on the dead replica got a 500; the others finished on the live one.
        outcomes = [f.result(timeout=300) for f in in_flight]
        assert all(o == ("error", 500) or (o[0] == "ok" and o[1] != victim) for o in outcomes), outcomes

        # Ray Serve starts a new replica; until then the survivor answers. Wait for two live ones.
        live: set[str] = set()
        deadline = time.monotonic() + 180
        while len(live) < 2:
            assert time.monotonic() < deadline, f"no replacement replica; answered by {live}"
            for outcome in pool.map(request, range(4)):
                if outcome[0] == "ok":
                    live.add(outcome[1])
            time.sleep(0.5)
        assert victim not in live
        results = list(pool.map(lambda i: ask(client, f"Say {i}."), range(4)))
        assert all(replica in live for replica, _ in results)


# -- settings ------------------------------------------------------------------------------------------

def test_replicas_without_ray_is_one_line_naming_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as if it were not installed
    assert_one_line_error(capsys, ["serve", "--port", "0", "--replicas", "2"], "pip install leapllm[ray]")


@pytest.mark.parametrize("argv, pattern", [
    (["--replicas", "0"], "--replicas must be at least 1, got 0"),
    (["--replicas", "3", "--max-replicas", "2"], "--max-replicas (2) must be at least --replicas (3)"),
    (["--max-replicas", "4"], "--max-replicas needs --replicas"),
    (["--ray-address", "auto"], "--ray-address needs --replicas"),
    (["--replicas", "2", "--embedding-model", "default"], "not served by --replicas"),
])
def test_bad_replica_settings_are_one_line_and_exit_2(capsys, argv, pattern):
    assert_one_line_error(capsys, ["serve", "--port", "0", *argv], pattern)


def test_deployment_options_fixed_count_or_autoscaling_range():
    settings = ReplicaSettings(model=None, model_name=MODEL, threads=2, engine=EngineConfig(max_num_seqs=32),
                               max_waiting=100)
    fixed = deployment_options(2, None, settings)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2}
    # A replica batches max_num_seqs sequences; more wait at Ray's proxy, up to max_waiting.
    assert fixed["max_ongoing_requests"] == 32 and fixed["max_queued_requests"] == 100
    scaling = deployment_options(2, 5, settings)
    assert "num_replicas" not in scaling
    assert scaling["autoscaling_config"] == {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 5,
                                             "target_ongoing_requests": 16}
