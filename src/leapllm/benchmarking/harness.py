"""The benchmark orchestrator: one worker process per system, interleaved repeats, medians.

Fairness: every system gets the same prompt token ids (built here once, from real text, with
leapllm's tokenizer), the same thread count and the same lengths; each system lives in its own
process, so no system's memory or allocator state leaks into another's; every measurement gets one
untimed warm-up per system; then each repeat runs, for each measurement, every system in turn
(A B A B ...), so drift in machine speed hits them alike; the median over repeats is reported.
The batched-serving figures (`serve bN`: N requests with N different prompts at once) run as a
second phase, with their own warm-up and repeats, after the memory figures are read: a serving
engine's KV pool is not billed to the model's peak memory (the JSON has it as serve_peak_memory_mib).

Honesty: a system that cannot be loaded is reported as missing with its reason, a worker that dies
or stops answering as failed, a measurement a peer's API does not offer as unsupported; a float32
system whose greedy tokens disagree with leapllm-float32's is broken and gets no speed figures
(half precision, quantized weights and llama.cpp only report how far they agree). A speculative
system (leapllm-int4+ngram, leapllm-int4+draft) must give exactly its base system's greedy tokens
(leapllm-int4's) on batch-1 and chat decoding, or it is broken too: speculation is checked, not trusted.
None of these stops the other systems. Workers are always ended, with timeouts, so nothing hangs.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import queue
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from leapllm.benchmarking.random_weights import BYTES_PER_VALUE, SHAPES, decode_floor, write_random_gguf
from leapllm.benchmarking.systems import (
    ALL_SYSTEMS,
    CUDA_ONLY_SYSTEMS,
    DEFAULT_LEAPLLM_SYSTEMS,
    PEERS,
    base_system,
    speculation_method,
    system_engine_dtype,
)
from leapllm.config import available_cpus
from leapllm.errors import InvalidRequestError, ModelLoadError, TokenizerError
from leapllm.output_files import check_writable
from leapllm.reference_text import CHAT_PROMPTS, chat_prompt_ids, reference_token_ids

REFERENCE = "leapllm-float32"
QUALITY_TOKENS = 16  # float32 systems must reproduce the reference's first greedy tokens exactly
# The greedy tokens a speculative system must reproduce exactly, all of them, from its base system.
SPECULATION_CHECKED = ("decode", "decode_chat")
SETTLE_S = 0.05  # pause before each timed request: the previous worker's threads stop spinning
QUIT_TIMEOUT_S = 10.0
# Serve prompts must differ within their first this many tokens: leapllm's prefix cache shares whole
# KV blocks (16 tokens by default), so requests that differ there share no cached prefix.
DISTINCT_PREFIX = 16

Log = Callable[[str], None]


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- settings ----------------------------------------------------------------------------------

@dataclass
class BenchSettings:
    """What `leapllm bench` was asked for; lists may be given as "128,512" strings."""
    model: str | Path | None = None
    # A named shape (random_weights.SHAPES) with random weights instead of a model file; adds the
    # decode floor to the report.
    random_weights: str | None = None
    systems: str | Sequence[str] | None = None  # overrides the default list and --peers
    peers: str | Sequence[str] | None = "hf,llamacpp"
    device: str = "cpu"
    threads: int | None = None
    prompt_lens: str | Sequence[int] = (128, 512)
    decode_tokens: int = 128
    decode_prompt_len: int = 128  # the prompt before batch-1 and batched decoding
    chat_decode_tokens: int = 128  # greedy tokens after each chat prompt; 0: no chat decode figure
    batches: str | Sequence[int] = (8, 32)  # "none": no batched decode figures
    batch_decode_tokens: int = 32
    serve_batches: str | Sequence[int] | None = (16, 32)  # "none" or empty: no serve figures
    serve_output_tokens: int = 128
    serve_prompt_len: int = 128
    repeats: int = 3
    draft_model: str | Path | None = None  # the draft of the leapllm-<dtype>+draft systems
    num_speculative_tokens: int = 4  # proposals per step of the speculative systems, at most
    contend: int = 0  # busy-loop processes running beside the systems while they are measured
    timeout: float = 600.0  # seconds one request may take before its worker counts as hung
    load_timeout: float = 900.0  # seconds each worker may take to load its system
    json: str | Path | None = None
    markdown: str | Path | None = None


@dataclass
class Plan:
    """Validated settings."""
    path: Path
    model_given: str | None
    systems: list[str]
    device: str
    threads: int
    prompt_lens: list[int]
    decode_tokens: int
    decode_prompt_len: int
    batches: list[int]
    batch_decode_tokens: int
    repeats: int
    timeout: float
    load_timeout: float
    json: Path | None
    markdown: Path | None
    serve_batches: list[int] = field(default_factory=list)
    serve_output_tokens: int = 128
    serve_prompt_len: int = 128
    chat_decode_tokens: int = 128
    draft_model: Path | None = None
    num_speculative_tokens: int = 4
    context_length: int = 0
    max_seq_len: int = 0
    contend: int = 0
    random_weights: str | None = None

    def canonical_command(self) -> str:
        argv = ["leapllm", "bench"]
        if self.model_given:
            argv += ["--model", self.model_given]
        if self.random_weights:
            argv += ["--random-weights", self.random_weights]
        argv += ["--systems", ",".join(self.systems), "--device", self.device, "--threads", str(self.threads),
                 "--prompt-lens", ",".join(map(str, self.prompt_lens)),
                 "--decode-tokens", str(self.decode_tokens), "--decode-prompt-len", str(self.decode_prompt_len),
                 "--chat-decode-tokens", str(self.chat_decode_tokens),
                 "--batches", ",".join(map(str, self.batches)) or "none",
                 "--batch-decode-tokens", str(self.batch_decode_tokens),
                 "--serve-batches", ",".join(map(str, self.serve_batches)) or "none",
                 "--serve-output-tokens", str(self.serve_output_tokens),
                 "--serve-prompt-len", str(self.serve_prompt_len), "--repeats", str(self.repeats)]
        if self.draft_model is not None:
            argv += ["--draft-model", str(self.draft_model)]
        argv += ["--num-speculative-tokens", str(self.num_speculative_tokens)]
        if self.contend:
            argv += ["--contend", str(self.contend)]
        for flag, value in (("--json", self.json), ("--markdown", self.markdown)):
            if value is not None:
                argv += [flag, str(value)]
        return shlex.join(argv)


def names_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s and s.strip()]


def int_list(value: str | Sequence[int], flag: str) -> list[int]:
    try:
        items = [int(v) for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    except (TypeError, ValueError):
        raise InvalidRequestError(f"{flag} expects comma-separated integers, got {value!r}") from None
    if not items:
        raise InvalidRequestError(f"{flag} is empty")
    if min(items) < 1:
        raise InvalidRequestError(f"{flag} values must be positive, got {min(items)}")
    return sorted(set(items))


def optional_int_list(value: str | Sequence[int] | None, flag: str) -> list[int]:
    """int_list, where None, "none" or an empty list means no value at all."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return []
    if not isinstance(value, str) and not [v for v in value if str(v).strip()]:
        return []
    return int_list(value, flag)


def batch_list(value: str | Sequence[int]) -> list[int]:
    """--batches: int_list, where "none" (or an empty list) means no batched decode figures; an empty
    string stays an error, as a typo is likelier than a wish."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return []
    if not isinstance(value, str) and not [v for v in value if str(v).strip()]:
        return []
    return int_list(value, "--batches")


def at_least(value: Any, minimum: int, flag: str, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequestError(f"{flag} must be an integer of at least {minimum}{why}, got {value!r}")
    return value


def zero_or_at_least(value: Any, minimum: int, flag: str, why: str = "") -> int:
    """0 (the figure is off) or an integer of at least `minimum`."""
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return 0
    return at_least(value, minimum, flag, why)


def speculative_tokens(value: Any) -> int:
    from leapllm.config import MAX_SPECULATIVE_TOKENS

    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SPECULATIVE_TOKENS:
        raise InvalidRequestError(f"--num-speculative-tokens must be an integer from 1 to {MAX_SPECULATIVE_TOKENS}, "
                                  f"got {value!r}")
    return value


def resolve_systems(settings: BenchSettings) -> list[str]:
    if settings.systems is not None:
        names = names_list(settings.systems)
        if not names:
            raise InvalidRequestError("--systems is empty")
    else:
        peers = names_list(settings.peers)
        if peers == ["none"]:
            peers = []
        for peer in peers:
            if peer not in PEERS:
                raise InvalidRequestError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)} (or none)")
        names = DEFAULT_LEAPLLM_SYSTEMS + [s for p in dict.fromkeys(peers) for s in PEERS[p]]
    for name in names:
        if name not in ALL_SYSTEMS:
            raise InvalidRequestError(f"unknown system {name!r}; choose from {', '.join(ALL_SYSTEMS)}")
        if name in CUDA_ONLY_SYSTEMS and settings.device != "cuda":
            raise InvalidRequestError(f"system {name!r} needs --device cuda")
    return list(dict.fromkeys(names))  # keep the order, drop repeats


def draft_model_path(value: str | Path | None) -> Path | None:
    """--draft-model: a file (GGUF) or a model folder that exists; loaded as given by the +draft systems."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        raise ModelLoadError(f"--draft-model {path}: no such file or folder")
    return path


def output_path(value: str | Path | None, flag: str) -> Path | None:
    if value is None:
        return None
    return check_writable(Path(value).expanduser(), flag)


def resolve(settings: BenchSettings) -> Plan:
    """Check every setting before anything is started; bad ones raise InvalidRequestError/ModelLoadError."""
    import torch

    from leapllm.loading.default_model import default_model_path

    if settings.device not in ("cpu", "cuda"):
        raise InvalidRequestError(f"--device must be cpu or cuda, got {settings.device!r}")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("--device cuda was asked for, but torch sees no CUDA GPU")
    systems = resolve_systems(settings)
    prompt_lens = int_list(settings.prompt_lens, "--prompt-lens")
    batches = batch_list(settings.batches)
    decode_tokens = at_least(settings.decode_tokens, 2, "--decode-tokens", " (a decode rate needs two tokens)")
    chat_tokens = zero_or_at_least(settings.chat_decode_tokens, 2, "--chat-decode-tokens",
                                   " (a decode rate needs two tokens; 0: no chat decode figure)")
    num_speculative = speculative_tokens(settings.num_speculative_tokens)
    batch_tokens = at_least(settings.batch_decode_tokens, 2, "--batch-decode-tokens",
                            " (a decode rate needs two tokens)")
    decode_prompt_len = at_least(settings.decode_prompt_len, 1, "--decode-prompt-len")
    serve_batches = optional_int_list(settings.serve_batches, "--serve-batches")
    serve_tokens = at_least(settings.serve_output_tokens, 1, "--serve-output-tokens")
    serve_prompt_len = at_least(settings.serve_prompt_len, 1, "--serve-prompt-len")
    repeats = at_least(settings.repeats, 1, "--repeats")
    threads = torch.get_num_threads() if settings.threads is None else at_least(settings.threads, 1, "--threads")
    contend = at_least(settings.contend, 0, "--contend")
    cores = len(available_cpus())
    if contend >= cores:
        raise InvalidRequestError(f"--contend {contend} would leave none of this machine's {cores} cores free "
                                  f"(at most {cores - 1})")
    for flag, value in (("--timeout", settings.timeout), ("--load-timeout", settings.load_timeout)):
        if not isinstance(value, (int, float)) or value <= 0:
            raise InvalidRequestError(f"{flag} must be a positive number of seconds, got {value!r}")
    json_path, md_path = output_path(settings.json, "--json"), output_path(settings.markdown, "--markdown")

    if settings.random_weights is not None:
        if settings.model is not None:
            raise InvalidRequestError("give --model or --random-weights, not both")
        if settings.random_weights not in SHAPES:
            raise InvalidRequestError(f"unknown shape {settings.random_weights!r} for --random-weights; choose "
                                      f"from {', '.join(SHAPES)}")
        path = Path(f"random-{settings.random_weights}.gguf")  # written by run_bench, in a temporary folder
    else:
        path = Path(settings.model).expanduser() if settings.model is not None else default_model_path()
        if not path.exists():
            raise ModelLoadError(f"{path}: no such file")
        if not path.is_file() or path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: bench needs a GGUF file (every system loads the same file)")
    draft = draft_model_path(settings.draft_model)
    plan = Plan(path=path, model_given=str(settings.model) if settings.model is not None else None,
                systems=systems, device=settings.device, threads=threads, prompt_lens=prompt_lens,
                decode_tokens=decode_tokens, decode_prompt_len=decode_prompt_len, batches=batches,
                batch_decode_tokens=batch_tokens, repeats=repeats, timeout=float(settings.timeout),
                load_timeout=float(settings.load_timeout), json=json_path, markdown=md_path,
                serve_batches=serve_batches, serve_output_tokens=serve_tokens, serve_prompt_len=serve_prompt_len,
                chat_decode_tokens=chat_tokens, draft_model=draft, num_speculative_tokens=num_speculative,
                contend=contend, random_weights=settings.random_weights)
    # The chat prompts' lengths are only known with the tokenizer: run_bench adds them (fit_chat_prompts).
    plan.max_seq_len = max(max(prompt_lens) + 1, decode_prompt_len + max(decode_tokens, batch_tokens if batches else 0),
                           serve_prompt_len + serve_tokens if serve_batches else 0)
    return plan


# -- prompts and measurements ------------------------------------------------------------------

def open_model_file(path: Path):
    """The tokenizer and context length, read from the GGUF file without loading weights."""
    from leapllm.loading.gguf_file import open_gguf
    from leapllm.tokenization import Tokenizer

    _, meta = open_gguf(path)
    arch = meta.get("general.architecture")
    context = meta.get(f"{arch}.context_length")
    if not isinstance(context, int) or context < 1:
        raise ModelLoadError(f"{path}: GGUF metadata has no {arch}.context_length")
    return Tokenizer.from_gguf_metadata(meta), context


def chat_prompts(tokenizer) -> list[tuple[str, list[int]]]:
    """(kind, ids) of every chat prompt (reference_text.CHAT_PROMPTS in the model's chat template)."""
    try:
        return chat_prompt_ids(tokenizer)
    except TokenizerError as exc:
        raise InvalidRequestError(f"the chat decode figure needs the model's chat template: {exc} "
                                  "(--chat-decode-tokens 0 skips it)") from None


def fit_chat_prompts(plan: Plan, tokenizer) -> list[tuple[str, list[int]]]:
    """The chat prompts, with the plan's longest sequence raised to hold each and its answer."""
    if not plan.chat_decode_tokens:
        return []
    chat = chat_prompts(tokenizer)
    plan.max_seq_len = max(plan.max_seq_len, max(len(ids) for _, ids in chat) + plan.chat_decode_tokens)
    return chat


@dataclass
class Measurement:
    key: str  # "prefill@128", "decode", "decode_chat", "decode_b8", "serve_b16"
    label: str  # the column header
    request: dict
    tokens: int  # tokens the timed part produces or consumes: tokens/s = tokens / seconds
    phase: str = "main"  # "serve": run after the memory figures are read


def serve_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens: consecutive windows of the reference text, so no two share
    a prefix (the text repeats when too short, shifted, and the check below makes sure of it)."""
    ids = reference_token_ids(tokenizer, count * length)
    prompts = [ids[i * length:(i + 1) * length] for i in range(count)]
    heads = {tuple(p[:DISTINCT_PREFIX]) for p in prompts}
    if len(heads) < count:
        raise InvalidRequestError(f"the reference text gives no {count} prompts of {length} tokens with different "
                                  f"first {DISTINCT_PREFIX} tokens; ask for fewer --serve-batches requests or a "
                                  "shorter --serve-prompt-len")
    return prompts


def measurements(plan: Plan, tokenizer, chat: list[tuple[str, list[int]]] | None = None) -> list[Measurement]:
    out = [Measurement(f"prefill@{n}", f"prefill@{n}", {"op": "prefill", "ids": reference_token_ids(tokenizer, n)}, n)
           for n in plan.prompt_lens]
    ids = reference_token_ids(tokenizer, plan.decode_prompt_len)
    out.append(Measurement("decode", "decode b1", {"op": "decode", "ids": ids, "n": plan.decode_tokens},
                           plan.decode_tokens - 1))
    if plan.chat_decode_tokens:
        # Batch-1 decoding of chat answers: what speculative decoding is judged on. One request runs
        # every prompt in turn; the tokens/s is over their summed decode times.
        chat = chat if chat is not None else chat_prompts(tokenizer)
        n = plan.chat_decode_tokens
        out.append(Measurement("decode_chat", "chat decode b1",
                               {"op": "decode_many", "prompts": [p for _, p in chat], "n": n}, len(chat) * (n - 1)))
    for b in plan.batches:
        out.append(Measurement(f"decode_b{b}", f"decode b{b} total",
                               {"op": "batched_decode", "ids": ids, "batch": b, "n": plan.batch_decode_tokens},
                               b * (plan.batch_decode_tokens - 1)))
    for b in plan.serve_batches:
        out.append(Measurement(f"serve_b{b}", f"serve b{b}",
                               {"op": "serve", "prompts": serve_prompts(tokenizer, b, plan.serve_prompt_len),
                                "n": plan.serve_output_tokens},
                               b * plan.serve_output_tokens, phase="serve"))
    return out


def figure_specs(todo: list[Measurement]) -> list[dict]:
    """The report's columns. Every measurement gives a tokens/s figure (higher is better); a serve
    measurement also gives its time to first token, mean and max over the requests, in ms (lower is
    better: its ratio is peer / leapllm, so > 1 still means leapllm is faster)."""
    out = []
    for m in todo:
        out.append({"key": m.key, "label": m.label, "unit": "tok/s", "better": "higher", "source": m.key,
                    "ratio": True})
        if m.phase == "serve":
            b = m.key.removeprefix("serve_b")
            out.append({"key": f"{m.key}_ttft", "label": f"TTFT b{b}", "unit": "ms", "better": "lower",
                        "source": m.key, "ratio": True})
            out.append({"key": f"{m.key}_ttft_max", "label": f"TTFT max b{b}", "unit": "ms", "better": "lower",
                        "source": m.key, "ratio": False})
    return out


# -- workers -----------------------------------------------------------------------------------

class WorkerError(Exception):
    """The worker died, stopped answering, or could not be talked to."""


def default_worker_command(name: str) -> list[str]:
    return [sys.executable, "-m", "leapllm.benchmarking.worker"]


class Worker:
    """One worker subprocess: JSON lines in, JSON lines out, every wait bounded by a timeout."""

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.stderr = tempfile.TemporaryFile()
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        env.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on a network
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, encoding="utf-8", bufsize=1, env=env,
                                     start_new_session=True)  # its own process group, ended as one
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:
                self.lines.put(line)
        except (OSError, ValueError):
            pass
        self.lines.put(None)  # end of output: the worker exited

    def receive(self, timeout: float, doing: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise WorkerError(f"no answer within {timeout:g} s while {doing}; worker ended") from None
            if line is None:
                raise WorkerError(f"worker exited while {doing} ({self.exit_description()})"
                                  + self.stderr_tail())
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue  # not a protocol line; the worker sends nothing else on stdout

    def request(self, message: dict, timeout: float, doing: str) -> dict:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # it died: receive() sees the end of its output and says why
        return self.receive(timeout, doing)

    def exit_description(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            return "its output closed, so it was ended"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"

    def stderr_tail(self) -> str:
        try:
            self.stderr.seek(0, os.SEEK_END)
            size = self.stderr.tell()
            self.stderr.seek(max(0, size - 8192))
            text = self.stderr.read().decode("utf-8", "replace").replace("\r", "\n")
        except (OSError, ValueError):
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return f"; last stderr line: {lines[-1][:300]}" if lines else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        """Ask it to quit; end it if it does not within a few seconds; release everything."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=QUIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.stderr):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


# -- the run -----------------------------------------------------------------------------------

def new_entry(name: str) -> dict:
    engine, dtype = system_engine_dtype(name)
    method = speculation_method(name)
    return {"name": name, "engine": engine, "dtype": dtype, "status": "ok", "reason": None, "load_s": None,
            "first_token_s": None,
            "info": {}, "memory": {}, "peak_memory_mib": None, "resident_memory_mib": None,
            "warmup": {}, "runs": {}, "notes": {}, "serve_peak_memory_mib": None,
            "tokens": {}, "greedy_agreement": None, "batched_agreement": {}, "batched_agreement_own": {},
            "figures": {}, "pid": None,
            # A speculative system: its method, its base system, and whether its greedy tokens were
            # those of the base (per measurement: True, False, or None when not checked, and why).
            "speculative": method, "base": base_system(name) if method else None,
            "identical_to_base": {}, "speculation_check": None, "speedup_over_base": {}}


def fail(entry: dict, status: str, reason: str, log: Log) -> None:
    entry.update(status=status, reason=reason)
    log(f"  {entry['name']} {status}: {reason}")


def worker_argv(plan: Plan, name: str, worker_command: Callable[[str], list[str]]) -> list[str]:
    argv = worker_command(name) + ["--system", name, "--model", str(plan.path), "--device", plan.device,
                                   "--threads", str(plan.threads), "--max-seq-len", str(plan.max_seq_len)]
    method = speculation_method(name)
    if method is not None:
        argv += ["--num-speculative-tokens", str(plan.num_speculative_tokens)]
    if method == "draft" and plan.draft_model is not None:
        argv += ["--draft-model", str(plan.draft_model)]
    return argv


def unloadable_reason(plan: Plan, name: str) -> str | None:
    """Why a system cannot be loaded with these settings, known before starting its worker."""
    if speculation_method(name) == "draft" and plan.draft_model is None:
        return ("needs a draft model: give --draft-model PATH (a smaller model with the same tokenizer, "
                "GGUF file or folder)")
    return None


# Timed right after each load, alone: a prompt of a short chat line's length, whose answer's first
# token is what a user waits for once the model is loaded. It pays what a system leaves for its first
# request: llama.cpp pages its weights in from the memory map; leapllm builds its fused decode step.
FIRST_PROMPT_TOKENS = 8


def start_workers(plan: Plan, names: list[str], entries: dict[str, dict], log: Log,
                  worker_command: Callable[[str], list[str]], workers: dict[str, Worker],
                  first_request: dict | None = None) -> None:
    """Start the workers one after another, each once the one before it is ready, so that every
    load is timed alone: started together, each load shared the cores with the others' imports and
    loads (the default model's load read 5.5 s that way, 1.0 s alone). first_request (a prefill of
    FIRST_PROMPT_TOKENS) then runs at once on each, timed as its first_token_s.
    `workers` is the caller's, so an interrupted start still leaves every started worker to end."""
    for name in names:
        entry = entries[name]
        try:
            first = start_worker(plan, name, entry, worker_command, workers, first_request)
        except WorkerStartFailed as exc:
            fail(entry, exc.status, exc.reason, log)
            if name in workers:
                workers.pop(name).stop()
            continue
        log(f"  {name} loaded in {entry['load_s'] or 0:.2f} s{first}")


class WorkerStartFailed(Exception):
    """A system's worker did not start, load or answer its first prompt: the entry's status and why."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def start_worker(plan: Plan, name: str, entry: dict, worker_command: Callable[[str], list[str]],
                 workers: dict[str, Worker], first_request: dict | None) -> str:
    """start_workers for one system: its load (and first token) recorded in `entry`; the log's words
    for the first token. Raises WorkerStartFailed, the worker (if started) left in `workers` to stop."""
    reason = unloadable_reason(plan, name)
    if reason is not None:
        raise WorkerStartFailed("missing", reason)
    try:
        workers[name] = Worker(name, worker_argv(plan, name, worker_command))
    except OSError as exc:
        raise WorkerStartFailed("missing", f"could not start its worker: {exc}") from None
    try:
        msg = workers[name].receive(plan.load_timeout, "loading")
    except WorkerError as exc:
        raise WorkerStartFailed("missing", str(exc)) from None
    if msg.get("event") != "ready":
        raise WorkerStartFailed("missing", msg.get("reason") or f"unexpected first message {msg!r}")
    entry.update(load_s=msg.get("load_s"), info=msg.get("info") or {}, pid=msg.get("pid"))
    entry["memory"].update(msg.get("memory") or {})
    if first_request is None:
        return ""
    try:
        reply = workers[name].request(first_request, plan.timeout, "answering its first prompt")
    except WorkerError as exc:
        raise WorkerStartFailed("failed", f"first prompt: {exc}") from None
    seconds = reply_seconds(reply)
    if not reply.get("ok") or not seconds > 0:
        raise WorkerStartFailed("failed", f"first prompt: {reply.get('error') or f'measured {seconds} s'}")
    entry["first_token_s"] = seconds
    return f", its first token {1000 * seconds:.0f} ms after"


def reply_seconds(reply: dict) -> float:
    """A worker's measured seconds; NaN where its reply has none that reads as a number."""
    try:
        return float(reply["seconds"])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def measure(worker: Worker, entry: dict, m: Measurement, plan: Plan, warmup: bool, log: Log) -> None:
    """One request; its result goes to entry['warmup'] or entry['runs']; failure marks the entry."""
    time.sleep(SETTLE_S)
    try:
        reply = worker.request(m.request, plan.timeout, f"measuring {m.key}")
    except WorkerError as exc:
        fail(entry, "failed", f"{m.key}: {exc}", log)
        return
    if not reply.get("ok"):
        if reply.get("unsupported"):
            entry["notes"][m.key] = f"not supported by this peer's API: {reply.get('error')}"
        else:
            fail(entry, "failed", f"{m.key}: {reply.get('error')}", log)
        return
    seconds = reply_seconds(reply)
    if not seconds > 0:
        fail(entry, "failed", f"{m.key}: measured {seconds} s", log)
        return
    run = {"seconds": seconds, "tokens_per_s": m.tokens / seconds}
    if "ttft" in reply:  # a serve measurement: each request's first token, seconds after t0
        try:
            ttft = [float(t) for t in reply["ttft"]]
        except (TypeError, ValueError):
            ttft = []
        if len(ttft) != len(m.request["prompts"]) or not all(0 < t <= seconds for t in ttft):
            fail(entry, "failed", f"{m.key}: first-token times {reply['ttft']} do not fit in {seconds} s", log)
            return
        run.update(ttft_s=ttft, ttft_mean_s=statistics.fmean(ttft), ttft_max_s=max(ttft))
    if m.request["op"] == "decode_many" and len(reply.get("tokens") or []) != len(m.request["prompts"]):
        fail(entry, "failed", f"{m.key}: tokens for {len(reply.get('tokens') or [])} of "
                              f"{len(m.request['prompts'])} prompts", log)
        return
    if "speculation" in reply:  # what a speculative system proposed and kept in this call
        run["speculation"] = reply["speculation"]
    if warmup:
        entry["warmup"][m.key] = run
    else:
        entry["runs"].setdefault(m.key, []).append(run)
    if "tokens" in reply:
        entry["tokens"].setdefault(m.key, []).append(reply["tokens"])


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check_quality(entries: list[dict], reference: list[int] | None, plan: Plan) -> None:
    """Greedy agreement with leapllm-float32. A float32 torch system that disagrees early is broken;
    llama.cpp (its own Q4_1 kernels), half precision and leapllm's quantized systems (dtype "int4",
    "int8": quantized weights) only report how far they agree."""
    if reference is None:
        return
    gated = {"leapllm", "hf", "hfcompile"}
    need = min(QUALITY_TOKENS, plan.decode_tokens)
    for e in entries:
        if e["status"] != "ok":
            continue
        runs = e["tokens"].get("decode", [])
        if runs:
            e["greedy_agreement"] = min(common_prefix(t, reference) for t in runs)  # the worst run counts
            if e["engine"] in gated and e["dtype"] == "float32" and e["greedy_agreement"] < need:
                e.update(status="broken", reason=f"greedy tokens agree with {REFERENCE} for "
                                                 f"{e['greedy_agreement']} < {need} tokens")
                continue
        for key, batches in e["tokens"].items():
            if not key.startswith("decode_b"):
                continue
            # Every row has the reference's prompt, so every row should give the reference's tokens.
            agree = min(common_prefix(row, reference) for rows in batches for row in rows)
            e["batched_agreement"][key] = agree
            if runs:  # and the system's own batch-1 tokens: a check of its batching alone
                e["batched_agreement_own"][key] = min(common_prefix(row, runs[0]) for rows in batches for row in rows)
            need_b = min(need, plan.batch_decode_tokens)
            if e["engine"] in gated and e["dtype"] == "float32" and agree < need_b:
                e["notes"][key] = f"withheld: batched rows agree with {REFERENCE} for {agree} < {need_b} tokens"


# CPU features (Linux /proc/cpuinfo flags) and the name llama.cpp's system info gives each when its
# build uses it: a feature the CPU has and the build lacks is a slower peer than the machine allows.
LLAMACPP_ISA = {"avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx512f": "AVX512", "avx512_vnni": "AVX512_VNNI",
                "avx512_bf16": "AVX512_BF16", "avx_vnni": "AVX_VNNI", "amx_int8": "AMX_INT8"}


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags, or None where /proc/cpuinfo cannot tell."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def missing_isa(system_info: str, flags: set[str]) -> list[str]:
    """The features this CPU has that llama.cpp's build does not use (its system info: "AVX2 = 1 | ...")."""
    used = {part.split("=")[0].split(":")[-1].strip() for part in system_info.replace("\n", "|").split("|")
            if part.split("=")[-1].strip() == "1"}  # "CPU : AVX2 = 1 | F16C = 1 | ..."
    return [name for flag, name in LLAMACPP_ISA.items() if flag in flags and name not in used]


def check_peer_build(entries: list[dict], flags: set[str] | None, device: str) -> None:
    """A llama.cpp built without an instruction set this CPU has (an AMX CPU with a build that fell
    back to AVX-512, or a generic x86-64 build) would flatter leapllm: it gets no speed figures."""
    if not flags or device != "cpu":
        return
    for e in entries:
        info = e.get("info") or {}
        if e["engine"] != "llamacpp" or e["status"] != "ok" or "system_info" not in info:
            continue
        missing = missing_isa(info["system_info"], flags)
        e["peer_build_missing"] = missing
        if missing:
            e.update(status="broken", reason=f"this llama.cpp build does not use {', '.join(missing)}, which this CPU "
                                             "has: not the fastest build that runs here (see benchmarks/README.md, "
                                             "Installing the peers)")


def first_difference(tokens, base) -> str | None:
    """Where one run's greedy tokens part from the base's: None when identical. A decode_chat run is
    a list of rows, one per chat prompt."""
    if tokens and isinstance(tokens[0], list):
        for i, (row, base_row) in enumerate(zip(tokens, base)):
            where = first_difference(row, base_row)
            if where is not None:
                kind = CHAT_PROMPTS[i][0] if i < len(CHAT_PROMPTS) else str(i)
                return f"chat prompt {i} ({kind}): {where}"
        return None if len(tokens) == len(base) else f"{len(tokens)} rows instead of {len(base)}"
    if list(tokens) == list(base):
        return None
    n = common_prefix(tokens, base)
    return f"from token {n} on (of {len(base)})" if len(tokens) == len(base) else \
        f"{len(tokens)} tokens instead of {len(base)}"


def check_speculation(entries: list[dict]) -> None:
    """A speculative system must give its base system's greedy tokens, all of them, on every run of
    batch-1 and chat decoding: verification keeps a proposal only when it is the model's own argmax.
    One differing token makes it broken (no speed figures). Without its base in the run (or without
    the base's tokens) nothing is checked, and the report says so."""
    by_name = {e["name"]: e for e in entries}
    labels = {"decode": "decode b1", "decode_chat": "chat decode b1"}
    for e in entries:
        if e["speculative"] is None or e["status"] != "ok":
            continue
        base = by_name.get(e["base"])
        unchecked, differences = [], []
        for key in SPECULATION_CHECKED:
            runs = e["tokens"].get(key)
            if not runs:
                continue
            base_runs = (base or {}).get("tokens", {}).get(key)
            if not base_runs:
                e["identical_to_base"][key] = None
                unchecked.append(labels[key])
                continue
            wheres = [w for w in (first_difference(t, base_runs[0]) for t in runs) if w is not None]
            e["identical_to_base"][key] = not wheres
            if wheres:
                differences.append(f"{labels[key]}: {wheres[0]}")
        checked = [labels[k] for k, same in e["identical_to_base"].items() if same]
        if differences:
            e["speculation_check"] = f"differ from {e['base']}'s ({'; '.join(differences)})"
            e.update(status="broken", reason=f"greedy tokens differ from its base {e['base']}'s: "
                                             f"{'; '.join(differences)}")
            continue
        why = (f"{e['base']} is not in this run (add it to --systems to check)" if base is None else
               f"{e['base']} gave no tokens to compare ({base['status']}: {base['reason']})")
        parts = ([f"identical to {e['base']}'s on {' and '.join(checked)}"] if checked else []) + \
                ([f"not checked on {' and '.join(unchecked)}: {why}"] if unchecked else [])
        e["speculation_check"] = "; ".join(parts) or None


def speculation_speedups(entries: list[dict]) -> None:
    """What speculation gains: each speculative system's decode figures over its base's, same run."""
    by_name = {e["name"]: e for e in entries}
    for e in entries:
        base = by_name.get(e["base"]) if e["speculative"] else None
        if base is None or e["status"] != "ok" or base["status"] != "ok":
            continue
        for key in SPECULATION_CHECKED:
            if key in e["figures"] and base["figures"].get(key):
                e["speedup_over_base"][key] = e["figures"][key] / base["figures"][key]


def finish_entry(e: dict, plan: Plan) -> None:
    """Medians (never for a system that is not ok, or a figure with a note) and peak memory."""
    e["figures"] = {}
    if e["status"] == "ok":
        for key, runs in e["runs"].items():
            if key not in e["notes"]:
                e["figures"][key] = statistics.median(r["tokens_per_s"] for r in runs)
                if all("ttft_mean_s" in r for r in runs):
                    e["figures"][f"{key}_ttft"] = 1000 * statistics.median(r["ttft_mean_s"] for r in runs)
                    e["figures"][f"{key}_ttft_max"] = 1000 * statistics.median(r["ttft_max_s"] for r in runs)
    mem = e["memory"]
    before, after, end = (mem.get(k) or {} for k in ("before_load", "after_load", "end"))
    # Peak: the most the process (CUDA: torch's allocator) ever held above its state before loading,
    # load temporaries included. Resident: what stayed after loading (freed heap given back).
    now, peak = ("gpu_allocated_mib", "gpu_peak_mib") if plan.device == "cuda" else ("rss_mib", "peak_rss_mib")
    if e["status"] == "ok" and before.get(now) is not None:
        if end.get(peak) is not None:
            e["peak_memory_mib"] = end[peak] - before[now]
        if after.get(now) is not None:
            e["resident_memory_mib"] = after[now] - before[now]
        if (mem.get("after_serve") or {}).get(peak) is not None:
            e["serve_peak_memory_mib"] = mem["after_serve"][peak] - before[now]
    # One copy of the generated tokens is enough once they are checked.
    e["tokens"] = {k: v[0] for k, v in e["tokens"].items() if v}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compute_ratios(entries: list[dict], figures: list[dict]) -> dict[str, dict[str, float | None]]:
    """Each leapllm system against each peer, for every figure with a ratio (figure_specs), peak
    memory, the load and the cold start: leapllm / peer for speeds and memory, peer / leapllm for
    times (TTFT, load), so that a speed ratio above 1 always means leapllm is faster."""
    ratios = {}
    for e in entries:
        if e["engine"] != "leapllm" or e["status"] != "ok":
            continue
        for peer in entries:
            if peer["engine"] == "leapllm" or peer["status"] != "ok":
                continue
            row = {}
            for f in figures:
                if f["ratio"]:
                    mine, theirs = e["figures"].get(f["key"]), peer["figures"].get(f["key"])
                    row[f["key"]] = ratio(mine, theirs) if f["better"] == "higher" else ratio(theirs, mine)
            for k in ("peak_memory_mib", "resident_memory_mib"):
                row[k] = ratio(e[k], peer[k])
            row["load_s"] = ratio(peer.get("load_s"), e.get("load_s"))
            row["cold_start_s"] = ratio(cold_start_s(peer), cold_start_s(e))
            ratios[f"{e['name']} / {peer['name']}"] = row
    return ratios


def cold_start_s(e: dict) -> float | None:
    """Seconds from asking for the model to its first token on a short prompt: the load, then the
    first request (start_workers')."""
    load, first = e.get("load_s"), e.get("first_token_s")
    return load + first if load is not None and first is not None else None


def package_version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def machine_info(plan: Plan) -> dict:
    import torch

    from leapllm.profiling.machine import device_name
    gpu = torch.cuda.get_device_name() if plan.device == "cuda" else None
    return {"cpu": device_name(torch.device("cpu")), "cores": os.cpu_count(), "threads": plan.threads,
            "device": plan.device,
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": package_version("transformers"),
            "llama_cpp_python": package_version("llama_cpp_python"),
            "leapllm": package_version("leapllm"), "platform": platform.platform(),
            "load_average": list(os.getloadavg())}


def start_busy_loops(count: int) -> list[subprocess.Popen]:
    """`count` processes that each keep one core busy (a pure-Python loop), as another program on a
    shared machine would: the systems are measured beside them."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(count)]


def stop_busy_loops(busy: list[subprocess.Popen]) -> None:
    for proc in busy:
        proc.kill()
    for proc in busy:
        proc.wait(timeout=QUIT_TIMEOUT_S)


def run_bench(settings: BenchSettings | Plan, *, command: str | None = None, log: Log = log_stderr,
              worker_command: Callable[[str], list[str]] = default_worker_command) -> dict:
    """Run the benchmark and return the report (a JSON-able dict); writes nothing but a random-weight
    model's file, in a temporary folder that is removed at the end."""
    plan = settings if isinstance(settings, Plan) else resolve(settings)
    if plan.random_weights is None:
        return run_on_file(plan, command, log, worker_command)
    from leapllm.loading.default_model import default_model_path
    with tempfile.TemporaryDirectory(prefix="leapllm-bench-") as folder:
        plan.path = Path(folder) / f"random-{plan.random_weights}.gguf"
        log(f"writing {plan.path.name}: the {plan.random_weights} shape with random float16 weights ...")
        write_random_gguf(SHAPES[plan.random_weights], plan.path, default_model_path())
        report = run_on_file(plan, command, log, worker_command)
        report["floor"] = decode_floor_report(plan, report["systems"])
    return report


def decode_floor_report(plan: Plan, entries: list[dict]) -> dict:
    """The batch-1 decode floor of the random-weight shape in each float dtype the systems compute in,
    at the device's bandwidth measured now (the workers have ended), and each system's decode as a
    fraction of its dtype's floor."""
    import torch

    from leapllm.loading.gguf_file import open_gguf
    from leapllm.profiling.machine import measure_bandwidth
    shape = SHAPES[plan.random_weights]
    vocab = len(open_gguf(plan.path)[1]["tokenizer.ggml.tokens"])
    bandwidth = measure_bandwidth(torch.device(plan.device), 2**30)
    context = plan.decode_prompt_len + plan.decode_tokens / 2  # the average context of the timed steps
    floors = {dtype: decode_floor(shape, vocab, dtype, context, bandwidth) for dtype in BYTES_PER_VALUE}
    of_floor = {}
    for e in entries:
        dtype = e["dtype"] if e["dtype"] in floors else None
        speed = e["figures"].get("decode")
        if dtype is not None and speed is not None:
            of_floor[e["name"]] = speed / floors[dtype]["tokens_per_s"]
    return {"shape": plan.random_weights, "bandwidth_bytes_per_s": bandwidth, "context": context,
            "by_dtype": floors, "decode_fraction_of_floor": of_floor}


def run_on_file(plan: Plan, command: str | None, log: Log, worker_command: Callable[[str], list[str]]) -> dict:
    tokenizer, plan.context_length = open_model_file(plan.path)
    if plan.max_seq_len > plan.context_length:
        raise InvalidRequestError(f"the longest sequence asked for ({plan.max_seq_len} tokens) exceeds the "
                                  f"model's context of {plan.context_length} tokens")
    chat = fit_chat_prompts(plan, tokenizer)
    if plan.max_seq_len > plan.context_length:
        raise InvalidRequestError(f"a chat prompt and its {plan.chat_decode_tokens} tokens ({plan.max_seq_len} tokens) "
                                  f"exceed the model's context of {plan.context_length} tokens")
    todo = measurements(plan, tokenizer, chat)
    figures = figure_specs(todo)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    machine = machine_info(plan)
    log(f"{date}  {machine['gpu'] or machine['cpu']}  threads={plan.threads}  torch {machine['torch']}  "
        f"transformers {machine['transformers']}  llama-cpp-python {machine['llama_cpp_python']}")
    if plan.device == "cpu" and machine["load_average"][0] > 0.5 * (machine["cores"] or 1):
        # Other busy processes make thread barriers wait for a time slice: timings become noise.
        log(f"warning: load average {machine['load_average'][0]:.1f} on {machine['cores']} cores before "
            "starting; CPU timings will be noisy")

    entries = {name: new_entry(name) for name in plan.systems}
    busy: list[subprocess.Popen] = []
    need_reference = REFERENCE not in plan.systems  # loaded only for its greedy tokens
    names = plan.systems + ([REFERENCE] if need_reference else [])
    reference_entry = new_entry(REFERENCE) if need_reference else entries[REFERENCE]
    entries_all = dict(entries, **{REFERENCE: reference_entry})
    decode = next(m for m in todo if m.key == "decode")
    workers: dict[str, Worker] = {}
    try:
        log(f"loading {len(names)} system(s): {', '.join(names)} ...")
        first_prompt = {"op": "prefill", "ids": reference_token_ids(tokenizer, FIRST_PROMPT_TOKENS)}
        start_workers(plan, names, entries_all, log, worker_command, workers, first_prompt)
        if plan.contend:
            log(f"contention: {plan.contend} busy-loop process(es) run beside the systems from now on")
            busy = start_busy_loops(plan.contend)
        if need_reference and REFERENCE in workers:
            measure(workers[REFERENCE], reference_entry, decode, plan, True, log)
            workers.pop(REFERENCE).stop()
        phases = [("", [m for m in todo if m.phase == "main"], "end"),
                  ("serve: ", [m for m in todo if m.phase == "serve"], "after_serve")]
        for prefix, phase, snapshot in phases:
            if not phase:
                continue
            # Round 0 is the untimed warm-up; then every repeat runs each measurement on every system.
            for rnd in range(plan.repeats + 1):
                log(prefix + ("warm-up" if rnd == 0 else f"repeat {rnd}/{plan.repeats}"))
                for m in phase:
                    for name in plan.systems:
                        e = entries[name]
                        if e["status"] != "ok" or name not in workers or m.key in e["notes"]:
                            continue
                        measure(workers[name], e, m, plan, rnd == 0, log)
                        if e["status"] != "ok":
                            workers.pop(name).stop()
            for name, worker in list(workers.items()):  # memory now, while each worker still lives
                try:
                    reply = worker.request({"op": "memory"}, plan.timeout, "reporting memory")
                    entries[name]["memory"][snapshot] = reply.get("memory")
                except WorkerError as exc:
                    fail(entries[name], "failed", f"memory: {exc}", log)
                    workers.pop(name).stop()
    finally:
        for worker in workers.values():
            worker.stop()
        stop_busy_loops(busy)

    ref_runs = reference_entry["tokens"].get("decode") or []
    reference = ref_runs[0] if ref_runs and reference_entry["status"] == "ok" else None
    quality_note = [] if reference is not None else [
        f"quality check skipped: {REFERENCE} gave no greedy tokens ({reference_entry['reason']})"]
    ordered = [entries[n] for n in plan.systems]
    check_quality(ordered, reference, plan)
    check_speculation(ordered)
    check_peer_build(ordered, cpu_flags(), plan.device)
    for e in ordered:
        finish_entry(e, plan)
    speculation_speedups(ordered)
    return {
        "date": date, "command": command or plan.canonical_command(), "canonical_command": plan.canonical_command(),
        "machine": machine, "model": plan.path.name, "random_weights": plan.random_weights,
        "settings": {"systems": plan.systems, "device": plan.device, "threads": plan.threads,
                     "prompt_lens": plan.prompt_lens, "decode_tokens": plan.decode_tokens,
                     "decode_prompt_len": plan.decode_prompt_len, "chat_decode_tokens": plan.chat_decode_tokens,
                     "batches": plan.batches,
                     "batch_decode_tokens": plan.batch_decode_tokens, "serve_batches": plan.serve_batches,
                     "serve_output_tokens": plan.serve_output_tokens, "serve_prompt_len": plan.serve_prompt_len,
                     "draft_model": str(plan.draft_model) if plan.draft_model is not None else None,
                     "num_speculative_tokens": plan.num_speculative_tokens, "repeats": plan.repeats,
                     "contend": plan.contend},
        "figures": figures,
        # The chat decode prompts, in the order of every per-prompt list (tokens, speculation counts).
        "chat_prompts": [{"kind": kind, "message": message, "prompt_tokens": len(ids)}
                         for (kind, message), (_, ids) in zip(CHAT_PROMPTS, chat)],
        "reference": REFERENCE, "reference_tokens": reference,
        "quality_tokens": min(QUALITY_TOKENS, plan.decode_tokens),
        "notes": quality_note, "load_average_at_end": list(os.getloadavg()),
        "systems": ordered, "ratios": compute_ratios(ordered, figures),
    }
