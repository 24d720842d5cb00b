"""`leapllm serve` as a command: bad settings are one line and exit 2, SIGTERM drains and exits 0."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.cli_helpers import assert_one_line_error


@pytest.mark.slow
def test_port_out_of_range_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "leapllm", "serve", "--port", "70000"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["leapllm: error: --port must be between 0 and 65535, got 70000"]


@pytest.mark.parametrize("argv, pattern", [
    (["--kv-cache-gb", "-1"], "--kv-cache-gb must be positive"),
    (["--max-num-seqs", "0"], "max_num_seqs must be at least 1"),
    (["--max-waiting", "-1"], "--max-waiting must be at least 0"),
    (["--port", "-5"], "--port must be between 0 and 65535"),
    (["--reports", "no-such-folder"], "--reports must be a folder"),
])
def test_bad_settings_are_one_line_and_exit_2(capsys, argv, pattern):
    assert_one_line_error(capsys, ["serve", *argv], pattern)


def test_port_in_use_is_one_line_and_exit_2(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(capsys, ["serve", "--port", str(port)], "already in use")


def test_bad_model_path_is_one_line_and_exit_2(capsys, tmp_path):
    assert_one_line_error(capsys, ["serve", "--port", "0", "--model", str(tmp_path / "missing.gguf")], "no such file")


class ServeProcess:
    """`leapllm serve --port 0` in a subprocess; learns its port from the startup line."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "leapllm", "serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        self.url: str | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stderr(self):
        for line in self.proc.stderr:  # drained to the end, so the server never blocks on a full pipe
            self.stderr.append(line)
            if m := re.search(r"serving .* at (http://[\d.]+:\d+)/v1", line):
                self.url = m.group(1)
        self.ready.set()

    def wait_healthy(self, timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.url is not None:
                try:
                    if httpx.get(f"{self.url}/health").status_code == 200:
                        return self.url
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not come up: {''.join(self.stderr)}")


def wait_until_running(url: str, count: int, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics").text
        if re.search(rf"^leapllm:num_requests_running{{.*}} {count}\.0$", text, re.MULTILINE):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_sigterm_finishes_or_cleanly_fails_requests_in_flight_then_exits_0():
    server = ServeProcess("--max-num-seqs", "4", "--kv-cache-gb", "0.05", "--shutdown-timeout", "2",
                          "--log-level", "warning")
    results = {}

    def plain():
        results["plain"] = httpx.post(f"{url}/v1/completions", json={
            "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "ignore_eos": True}, timeout=300)

    def stream():  # long: it outlives the grace period on any ordinary machine
        with httpx.stream("POST", f"{url}/v1/completions", json={
                "prompt": "Tell me a story", "max_tokens": 1000, "ignore_eos": True, "stream": True},
                timeout=300) as r:
            results["stream"] = [line for line in r.iter_lines() if line]

    try:
        url = server.wait_healthy()
        clients = [threading.Thread(target=plain), threading.Thread(target=stream)]
        for t in clients:
            t.start()
        assert wait_until_running(url, 2)
        server.proc.send_signal(signal.SIGTERM)
        for t in clients:
            t.join(300)
        assert server.proc.wait(timeout=120) == 0, "".join(server.stderr)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()

    r = results["plain"]
    if r.status_code == 200:  # finished within the grace period: complete
        assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 16
    else:  # or a clean OpenAI error, never a dropped connection or a bare 500
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    events = results["stream"]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last.get("error", {}).get("code") == "shutting_down" or last["choices"][0]["finish_reason"] == "length"
    server.ready.wait(10)
    assert "Traceback" not in "".join(server.stderr)
