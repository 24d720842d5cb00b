"""The hostile-input scenarios against a real `leapllm serve` and `leapllm generate` / `chat`: each
prints its outcome and whether it is the one wanted (a 4xx with an OpenAI-style error, a one-line
`leapllm: error:` with exit 2, a bounded wait), and the run ends with the counts of 500s, hangs and
tracebacks.

    .venv/bin/python benchmarks/abuse_scenarios.py [--files-only]

Uses the default model and writes its damaged copies to a temporary folder; --files-only skips the
server's request scenarios. Exit status 0 only if every scenario ended as wanted.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from leapllm.benchmarking.serve_load import ServerProcess
from leapllm.loading.default_model import default_model_path

KEY = "abuse-test-key"
RESULTS: list[tuple[str, str, bool]] = []
COUNTS = {"500": 0, "hang": 0, "traceback": 0}


def record(name: str, outcome: str, ok: bool) -> None:
    RESULTS.append((name, outcome, ok))
    print(f"{'ok  ' if ok else 'FAIL'}  {name}: {outcome}", flush=True)


class Server(ServerProcess):
    """`leapllm serve` with its log kept, to look for tracebacks."""

    def __init__(self, *args: str):
        super().__init__(list(args))
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def stop_timed(self) -> float:
        start = time.monotonic()
        if self.stop() == -signal.SIGKILL:  # SIGTERM did not end it within a minute
            COUNTS["hang"] += 1
        return time.monotonic() - start


def post(url: str, path: str, content: bytes | str | dict, timeout: float = 120, key: str | None = KEY):
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    body = json.dumps(content) if isinstance(content, dict) else content
    try:
        return httpx.post(url + path, content=body, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        COUNTS["hang"] += 1
        return None


def expect(name: str, reply, codes: tuple[int, ...], words: str = "") -> None:
    if reply is None:
        record(name, "no answer (hang)", False)
        return
    if reply.status_code >= 500:
        COUNTS["500"] += 1
    error = ""
    try:
        error = reply.json().get("error", {}).get("message", "")
    except (ValueError, AttributeError):
        pass
    ok = reply.status_code in codes and (not words or words in error.lower())
    if reply.status_code >= 400:
        ok = ok and bool(error)  # an OpenAI-style error object
    record(name, f"{reply.status_code} {error[:90]!r}", ok)


def server_scenarios(model: Path) -> None:
    s = Server("--model", str(model), "--api-key", KEY, "--served-model-name", "m", "--kv-cache-gb", "0.1",
               "--shutdown-timeout", "5")
    u = s.url
    c, ch = "/v1/completions", "/v1/chat/completions"
    expect("lone surrogate in prompt", post(u, c, '{"model": "m", "prompt": "a\\ud800b", "max_tokens": 2}'), (400,))
    expect("lone surrogate in message content",
           post(u, ch, '{"model": "m", "messages": [{"role": "user", "content": "\\udfff"}]}'), (400,))
    expect("lone surrogate in model", post(u, c, '{"model": "\\ud800", "prompt": "a"}'), (400, 404))
    expect("50 MB prompt", post(u, c, {"model": "m", "prompt": "word " * (10 * 2**20), "max_tokens": 1}), (413,))
    expect("5 MB prompt", post(u, c, {"model": "m", "prompt": "word " * (2**20), "max_tokens": 1}), (400,),
           "context")
    expect("100 prompts x n=128 beyond the KV pool",
           post(u, c, {"model": "m", "prompt": ["Hello there"] * 100, "n": 128, "max_tokens": 200}), (400,))
    for field, value in (("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}),
                         ("reasoning_effort", "high"), ("prediction", {"type": "content", "content": "x"}),
                         ("web_search_options", {})):
        expect(f"unimplemented field {field}",
               post(u, ch, {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value}), (400,),
               field)
    expect("temperature 2.5", post(u, c, {"model": "m", "prompt": "a", "temperature": 2.5}), (400,), "temperature")
    expect("repetition_penalty Infinity",
           post(u, c, '{"model": "m", "prompt": "a", "repetition_penalty": Infinity}'), (400,))
    expect("presence_penalty NaN", post(u, c, '{"model": "m", "prompt": "a", "presence_penalty": NaN}'), (400,))
    expect("malformed JSON", post(u, c, '{"model": "m", "prompt": '), (400,))
    expect("prompt of the wrong type", post(u, c, {"model": "m", "prompt": {"a": 1}}), (400,))
    expect("max_tokens -1", post(u, c, {"model": "m", "prompt": "a", "max_tokens": -1}), (400,))
    expect("token id out of range", post(u, c, {"model": "m", "prompt": [10**9], "max_tokens": 1}), (400,))
    expect("unknown model", post(u, c, {"model": "nope", "prompt": "a"}), (404,))
    expect("no api key", post(u, c, {"model": "m", "prompt": "a"}, key=None), (401,))
    expect("a tool call with a bad schema",
           post(u, ch, {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}),
           (400,))
    expect("a JSON schema that does not compile",
           post(u, ch, {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                        "response_format": {"type": "json_schema",
                                            "json_schema": {"name": "x", "schema": {"type": 5}}}}), (400,))
    for path in ("/docs", "/redoc", "/openapi.json"):
        r = httpx.get(u + path, timeout=30)
        record(f"{path} without the key", str(r.status_code), r.status_code in (401, 404))

    # Three rounds of 32 streams, a third of them dropped after their first chunk: no block may leak.
    def stream(i: int, drop: bool) -> None:
        body = {"model": "m", "prompt": f"Story {i}: once upon a time", "max_tokens": 48, "stream": True,
                "temperature": 0.7}
        try:
            with httpx.stream("POST", u + c, json=body, headers={"authorization": f"Bearer {KEY}"},
                              timeout=300) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if drop and n >= 1:
                        return
        except httpx.HTTPError:
            pass

    for _ in range(3):
        threads = [threading.Thread(target=stream, args=(i, i % 3 == 0)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    time.sleep(1.0)
    metrics = httpx.get(u + "/metrics", headers={"authorization": f"Bearer {KEY}"}, timeout=30).text
    running = re.search(r"^leapllm:num_requests_running\{.*\} (\S+)$", metrics, re.MULTILINE)
    used = re.search(r"^leapllm:kv_cache_blocks_used\{.*\} (\S+)$", metrics, re.MULTILINE)
    record("3 rounds of 32 streams, a third dropped", f"running {running and running.group(1)}, KV blocks in use "
           f"{used and used.group(1)}", bool(running and used and float(running.group(1)) == 0
                                              and float(used.group(1)) == 0))
    # SIGTERM in the middle of a long stream ends the server within --shutdown-timeout + a few seconds.
    t = threading.Thread(target=stream, args=(0, False))
    t.start()
    time.sleep(1.0)
    took = s.stop_timed()
    record("SIGTERM during a stream", f"exit {s.proc.returncode} after {took:.1f} s", took < 15)
    if "Traceback" in "".join(s.lines):
        COUNTS["traceback"] += 1
        record("server log", "holds a traceback", False)


def run_cli(args: list[str], timeout: float = 120, stdin: str = "") -> tuple[int | None, str, float]:
    start = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "leapllm", *args], check=False, capture_output=True, text=True,
                           timeout=timeout, input=stdin)
    except subprocess.TimeoutExpired:
        COUNTS["hang"] += 1
        return None, "", time.monotonic() - start
    if "Traceback" in p.stderr:
        COUNTS["traceback"] += 1
    return p.returncode, p.stderr.strip(), time.monotonic() - start


def expect_cli(name: str, args: list[str], timeout: float = 120, stdin: str = "") -> None:
    code, err, took = run_cli(args, timeout, stdin)
    lines = err.splitlines()
    ok = code == 2 and len(lines) == 1 and lines[0].startswith("leapllm: error:")
    record(name, f"exit {code} in {took:.1f} s: {(lines[-1] if lines else '')[:110]!r}", ok)


def copy_gguf(source: Path, out: Path, patch: dict, tensor_patch=None) -> Path:
    """A copy of `source` with metadata fields replaced (patch: key -> (value, type)) and, optionally,
    one tensor's values changed (tensor_patch(name, array) -> array or None)."""
    reader = GGUFReader(source)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    w = GGUFWriter(str(out), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name in patch:
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = field.types[-1]
            value = [str(bytes(field.parts[i]), "utf-8") if sub == GGUFValueType.STRING else field.parts[i].tolist()[0]
                     for i in field.data]
            w.add_array(name, value)
        elif vtype == GGUFValueType.STRING:
            w.add_key_value(name, str(bytes(field.parts[-1]), "utf-8"), vtype)
        else:
            w.add_key_value(name, field.parts[-1].tolist()[0], vtype)
    for name, (value, vtype) in patch.items():
        w.add_key_value(name, value, vtype)
    for t in reader.tensors:
        data = np.array(t.data)
        if tensor_patch is not None and (patched := tensor_patch(t.name, data)) is not None:
            data = patched
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)  # quantized: (rows, bytes per row) as read
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def model_file_scenarios(model: Path, work: Path) -> None:
    U32, F32, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    big = "{{ 'x' * 200000000 }}"
    files = {
        "head_count 0": {"llama.attention.head_count": (0, U32)},
        "head_count_kv 0": {"llama.attention.head_count_kv": (0, U32)},
        "block_count 2^32-1": {"llama.block_count": (2**32 - 1, U32)},
        "context_length 2^40": {"llama.context_length": (2**40, GGUFValueType.UINT64)},
        "rope base -10000": {"llama.rope.freq_base": (-10000.0, F32)},
        "rms_norm_eps NaN": {"llama.attention.layer_norm_rms_epsilon": (math.nan, F32)},
        "a looping chat template": {"tokenizer.chat_template": (loop, STR)},
        "a chat template writing 200 MB": {"tokenizer.chat_template": (big, STR)},
    }
    made = {name: copy_gguf(model, work / f"{i}.gguf", patch) for i, (name, patch) in enumerate(files.items())}

    def nan_norm(name, data):
        if name == "output_norm.weight":
            data = data.copy()
            data[5] = np.nan
            return data
        return None
    made["a NaN in the final norm"] = copy_gguf(model, work / "nan-norm.gguf", {}, nan_norm)

    def nan_scale(name, data):
        if name == "blk.0.attn_q.weight" and data.dtype == np.uint8:
            data = data.copy()
            data.reshape(-1)[0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
            return data
        return None
    made["a NaN scale in a quantized weight"] = copy_gguf(model, work / "nan-scale.gguf", {}, nan_scale)
    for name, path in made.items():
        if "template" in name:  # a user's message, typed into `leapllm chat`, then `generate --chat`
            expect_cli(f"chat, {name}", ["chat", "--model", str(path), "--max-tokens", "2"], 60, "hi\n")
            expect_cli(f"generate --chat, {name}", ["generate", "--chat", "hi", "--model", str(path),
                                                     "--max-tokens", "2"], 60)
        else:
            expect_cli(f"generate, {name}", ["generate", "hi", "--model", str(path), "--max-tokens", "2"])
    data = model.read_bytes()
    (work / "truncated.gguf").write_bytes(data[: len(data) // 3])
    expect_cli("generate, a file cut at a third", ["generate", "hi", "--model", str(work / "truncated.gguf")])
    folder = work / "folder"
    folder.mkdir()
    for name, cfg in (("config.json a list", [{"model_type": "llama"}]),
                      ("rope_scaling a string", {"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
                                                 "intermediate_size": 64, "num_hidden_layers": 2,
                                                 "num_attention_heads": 4, "rope_scaling": "yarn"}),
                      ("num_hidden_layers 1e9", {"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
                                                 "intermediate_size": 64, "num_hidden_layers": 10**9,
                                                 "num_attention_heads": 4})):
        (folder / "config.json").write_text(json.dumps(cfg))
        expect_cli(f"generate, {name}", ["generate", "hi", "--model", str(folder)])

    # A server on the looping template: the chat request fails, /health answers, SIGTERM ends it.
    s = Server("--model", str(made["a looping chat template"]), "--served-model-name", "m", "--shutdown-timeout", "5")
    expect("serve, a looping chat template",
           post(s.url, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                key=None), (400,), "template")
    start = time.monotonic()
    health = httpx.get(s.url + "/health", timeout=30).status_code
    record("serve, /health after the template", f"{health} in {time.monotonic() - start:.2f} s", health == 200)
    took = s.stop_timed()
    record("serve, SIGTERM after the template", f"exit {s.proc.returncode} after {took:.1f} s", took < 15)


def main() -> int:
    model = default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        if "--files-only" not in sys.argv:
            server_scenarios(model)
        model_file_scenarios(model, Path(tmp))
    failed = [r for r in RESULTS if not r[2]]
    print(f"\n{len(RESULTS)} scenarios, {len(failed)} not as wanted; {COUNTS['500']} x 5xx, {COUNTS['hang']} hangs, "
          f"{COUNTS['traceback']} tracebacks")
    return 1 if failed or any(COUNTS.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
