"""Core speed benchmark: leapllm against Hugging Face transformers on the same GGUF file.

For each system (engine x dtype) it measures prefill tokens/s at a few prompt lengths, batch-1
greedy decode tokens/s (decode time only, prefill excluded) and memory, and checks that the greedy
tokens agree with leapllm-float32 so a speed figure is never reported for a broken run.

Fairness: every system gets the same prompt token ids, the same thread count and inference_mode;
each measurement has one untimed warm-up; systems are interleaved (A B A B ...) in every repeat so
drift in machine speed hits all of them alike; the median over repeats is reported.

    python benchmarks/bench_core.py                         # CPU, the four default systems
    python benchmarks/bench_core.py --json out.json --markdown out.md
    python benchmarks/bench_core.py --device cuda --systems leapllm-bfloat16,hf-bfloat16
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import inspect
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_SYSTEMS = ["leapllm-float32", "leapllm-bfloat16", "hf-float32", "hf-bfloat16"]
CUDA_ONLY_SYSTEMS = ["leapllm-float16", "hf-float16"]  # float16 matmuls on CPU are not a real use case
REFERENCE = "leapllm-float32"
QUALITY_TOKENS = 16  # float32 systems must reproduce the reference's first greedy tokens exactly
MiB = 2**20
RATIO_CAPTION = "ratios of medians (speed > 1: leapllm faster; memory < 1: leapllm smaller)"


def die(message: str) -> None:
    print(f"bench_core.py: error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, instead of argparse's usage block
        die(message)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(values))


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--model", metavar="PATH", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--systems", help=f"comma list from {', '.join(CPU_SYSTEMS + CUDA_ONLY_SYSTEMS)} "
                   "(float16 on CUDA only; default: the four float32/bfloat16 systems)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--prompt-lens", type=int_list, default=[128, 512], help="prefill lengths (default 128,512)")
    p.add_argument("--decode-tokens", type=int, default=128, help="greedy tokens per decode run (default 128)")
    p.add_argument("--decode-prompt-len", type=int, default=128, help="prompt before decoding (default 128)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--json", metavar="PATH", help="write raw timings, medians and machine info")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    args = p.parse_args(argv)

    allowed = CPU_SYSTEMS + (CUDA_ONLY_SYSTEMS if args.device == "cuda" else [])
    names = [s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else CPU_SYSTEMS
    for name in names:
        if name in CUDA_ONLY_SYSTEMS and args.device != "cuda":
            die(f"system {name!r} needs --device cuda")
        if name not in allowed:
            die(f"unknown system {name!r}; choose from {', '.join(allowed)}")
    args.systems = list(dict.fromkeys(names))  # keep order, drop duplicates
    if not args.systems:
        die("--systems is empty")
    if args.decode_tokens < 2:
        die(f"--decode-tokens must be at least 2 (a decode rate needs two tokens), got {args.decode_tokens}")
    if args.decode_prompt_len < 1:
        die(f"--decode-prompt-len must be at least 1, got {args.decode_prompt_len}")
    if args.repeats < 1:
        die(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        die(f"--threads must be at least 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda was asked for, but torch sees no CUDA GPU")
    for out in (args.json, args.markdown):
        if out and not Path(out).resolve().parent.is_dir():
            die(f"cannot write {out}: its folder does not exist")
    return args


# -- machine and memory ------------------------------------------------------------------------

def proc_status_kib(key: str) -> int | None:
    """VmRSS / VmHWM of this process in KiB (psutil is not a dependency)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def release_freed_memory() -> None:
    # Give freed heap back to the OS, so one system's load-time temporaries are not silently
    # reused by the next system's weights (which would make the later one look smaller).
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str) -> dict:
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": tf_version,
        "platform": platform.platform(), "load_average": os.getloadavg(),
    }


def init_cuda() -> None:
    """The CUDA context and cuBLAS's workspace (about 32 MiB, counted by torch's allocator) appear
    with the first matmul: create them now, so they are not billed to whichever system runs first."""
    for dtype in DTYPES.values():
        a = torch.ones(64, 64, device="cuda", dtype=dtype)
        a @ a
    torch.cuda.synchronize()


def preload_libraries(names: list[str]) -> None:
    """Import both engines first, so no system's memory growth includes a library's import
    (transformers alone adds about 100 MiB of RSS)."""
    import leapllm.llm  # noqa: F401
    # The first model built on torch's meta device imports torch's compiler stack (about 70 MiB).
    import torch._dynamo  # noqa: F401
    if any(n.startswith("hf-") for n in names):
        try:
            import transformers.models.llama.modeling_llama  # noqa: F401
            from transformers import AutoModelForCausalLM  # noqa: F401
        except ImportError:
            pass  # reported per system as "missing" when it fails to load


# -- the systems -------------------------------------------------------------------------------

class Timer:
    """Wall clock that waits for queued GPU work first, so CUDA kernels are counted."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def weight_mib(model: torch.nn.Module) -> float:
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}  # tied once
    return sum(t.numel() * t.element_size() for t in tensors.values()) / MiB


class LeapSystem:
    def __init__(self, path: Path, dtype: str, device: str):
        from leapllm import LLM
        self.llm = LLM(path, dtype=dtype, device=device)
        self.device = self.llm.model.device
        self.context_length = self.llm.config.context_length
        self.timer = Timer(self.device)
        self.weights = {"mib": weight_mib(self.llm.model), "format": f"dense {dtype}"}

    def prefill(self, ids: list[int]) -> float:
        model = self.llm.model
        tokens = torch.tensor([ids], device=self.device)
        start = self.timer.now()
        # The cache is allocated inside the timed region: transformers builds its cache inside
        # the forward call, and generation allocates ours right before prefill too.
        cache = model.new_kv_cache(1, len(ids) + 1)
        model(tokens, 0, cache, last_only=True)
        return self.timer.now() - start

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        from leapllm import SamplingParams
        out = self.llm.run(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        if len(out.token_ids) != n:
            raise RuntimeError(f"generated {len(out.token_ids)} tokens instead of {n}")
        # run() times from the first token to the last (int() of each sampled token syncs CUDA).
        return (n - 1) / out.timings["decode_tokens_per_s"], out.token_ids


class HFSystem:
    def __init__(self, path: Path, dtype: str, device: str):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=DTYPES[dtype])
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.context_length = self.model.config.max_position_embeddings
        self.timer = Timer(self.device)
        # transformers renamed `past_key_values` to `cache` (5.2x); speak whichever this one knows.
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        # Some transformers versions keep GGUF blocks packed (with the `kernels` package) instead of
        # dequantizing: a different computation, so the report says which one ran.
        packed = sum("gguf" in type(m).__name__.lower() for m in self.model.modules())
        self.weights = {"mib": weight_mib(self.model), "attention": self.model.config._attn_implementation,
                        "format": f"{packed} modules with packed GGUF blocks" if packed else f"dense {dtype}"}

    def prefill(self, ids: list[int]) -> float:
        tokens = torch.tensor([ids], device=self.device)
        start = self.timer.now()
        # logits_to_keep=1 is what generate() passes at prefill, and matches our last_only=True.
        self.model(input_ids=tokens, use_cache=True, logits_to_keep=1)
        return self.timer.now() - start

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        # A manual greedy loop on transformers' own cache: the same work as leapllm's run().
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1)
        tokens = [int(out.logits[0, -1].float().argmax())]
        first = self.timer.now()
        for _ in range(n - 1):
            step = torch.tensor([[tokens[-1]]], device=self.device)
            out = self.model(input_ids=step, use_cache=True, **{self.cache_arg: out[self.cache_arg]})
            tokens.append(int(out.logits[0, -1].float().argmax()))
        return self.timer.now() - first, tokens


def load_system(name: str, path: Path, device: str) -> dict:
    """Load one system and measure what loading it added to the process (or the GPU)."""
    engine, dtype = name.split("-", 1)
    entry = {"name": name, "engine": engine, "dtype": dtype, "status": "ok", "reason": None,
             "runs": {}, "warmup": {}, "decode_tokens": [], "memory": {}}
    release_freed_memory()
    rss0, gpu0 = proc_status_kib("VmRSS"), torch.cuda.memory_allocated() if device == "cuda" else 0
    start = time.perf_counter()
    try:
        entry["system"] = (LeapSystem if engine == "leapllm" else HFSystem)(path, dtype, device)
    except Exception as e:  # noqa: BLE001 - whatever the reason, report it instead of a number
        entry.update(status="missing", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return entry
    entry["load_s"] = time.perf_counter() - start
    entry["weights"] = entry["system"].weights
    release_freed_memory()
    rss1 = proc_status_kib("VmRSS")
    mem = entry["memory"]
    if rss0 is not None and rss1 is not None:
        mem["rss_growth_at_load_mib"] = (rss1 - rss0) / 1024
    if device == "cuda":
        mem["gpu_resident_mib"] = (torch.cuda.memory_allocated() - gpu0) / MiB
        mem["gpu_working_peak_mib"] = 0.0
    return entry


# -- measuring ---------------------------------------------------------------------------------

def prompt_ids(tokenizer, length: int) -> list[int]:
    """Real text (the source of the argparse module) tokenized, repeated and cut to `length`."""
    ids = tokenizer.encode(inspect.getsource(argparse), add_special_tokens=False)
    return (ids * (length // len(ids) + 1))[:length]


def measure(entry: dict, key: str, ids: list[int], decode_tokens: int, device: str) -> dict:
    system = entry["system"]
    if device == "cuda":  # working memory on top of what is resident (all loaded systems)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    if key == "decode":
        seconds, tokens = system.decode(ids, decode_tokens)
        entry["decode_tokens"].append(tokens)
        run = {"seconds": seconds, "tokens_per_s": (decode_tokens - 1) / seconds}
    else:
        seconds = system.prefill(ids)
        run = {"seconds": seconds, "tokens_per_s": len(ids) / seconds}
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / MiB
        entry["memory"]["gpu_working_peak_mib"] = max(entry["memory"]["gpu_working_peak_mib"], peak)
    return run


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check_quality(entries: list[dict], reference: list[int], decode_tokens: int) -> None:
    """Greedy agreement with leapllm-float32; a float32 system that disagrees early is broken."""
    need = min(QUALITY_TOKENS, decode_tokens)
    for e in entries:
        if e["status"] != "ok":
            continue
        agree = min(common_prefix(t, reference) for t in e["decode_tokens"])  # worst run counts
        e["greedy_agreement"] = agree
        if e["dtype"] == "float32" and agree < need:
            e.update(status="broken", reason=f"greedy tokens agree with {REFERENCE} for {agree} < {need} tokens")


def median_figures(entry: dict) -> dict:
    if entry["status"] != "ok":  # never a speed figure for a broken or missing system
        return {}
    figures = {k: statistics.median(r["tokens_per_s"] for r in runs) for k, runs in entry["runs"].items()}
    mem = entry["memory"]
    if "gpu_resident_mib" in mem:
        figures["memory_mib"] = mem["gpu_resident_mib"] + mem["gpu_working_peak_mib"]
    elif "rss_growth_at_load_mib" in mem:
        figures["memory_mib"] = mem["rss_growth_at_load_mib"]
    return figures


# -- reporting ---------------------------------------------------------------------------------

def table_rows(entries: list[dict], keys: list[str], decode_tokens: int):
    """The main table and the ratio table as (header, rows) of strings."""
    header = ["system"] + [f"{k} tok/s" for k in keys] + ["memory MiB", f"greedy agree (of {decode_tokens})"]
    rows, by_name = [], {e["name"]: e for e in entries}
    for e in entries:
        if e["status"] != "ok":
            rows.append([e["name"]] + [e["status"]] * (len(keys) + 1) + [e["reason"] or ""])
            continue
        m = e["median"]
        agree = "" if e["name"] == REFERENCE else str(e.get("greedy_agreement", ""))
        rows.append([e["name"]] + [f"{m[k]:.1f}" for k in keys] + [fmt(m.get("memory_mib"), ".0f"), agree or "ref"])

    ratio_header = ["leapllm / hf"] + keys + ["memory"]
    ratio_rows, ratios = [], {}
    for e in entries:
        if e["engine"] != "leapllm" or e["status"] != "ok":
            continue
        for ref in dict.fromkeys(["hf-float32", f"hf-{e['dtype']}"]):
            r = by_name.get(ref)
            if r is None or r["status"] != "ok":
                continue
            figures = {k: ratio(e["median"].get(k), r["median"].get(k)) for k in keys + ["memory_mib"]}
            ratios[f"{e['name']} / {ref}"] = figures
            ratio_rows.append([f"{e['name']} / {ref}"] + [fmt(v, ".2f") for v in figures.values()])
    return [(header, rows), (ratio_header, ratio_rows)], ratios


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_tables(tables, title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console(width=max(Console().width, 120))  # 80 columns (a pipe) would cut the names
    for (header, rows), caption in zip(tables, [title, RATIO_CAPTION]):
        if not rows:
            continue
        t = Table(title=caption)
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for row in rows:
            t.add_row(*row)
        console.print(t)


def markdown(tables, header_line: str) -> str:
    lines = [header_line, ""]
    for (header, rows), caption in zip(tables, [None, RATIO_CAPTION]):
        if not rows:
            continue
        lines += [f"{caption[0].upper()}{caption[1:]}:", ""] if caption else []
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    preload_libraries(args.systems)
    if args.device == "cuda":
        init_cuda()
    from leapllm.errors import LeapLLMError
    from leapllm.loading.default_model import default_model_path
    try:
        path = Path(args.model).expanduser() if args.model else default_model_path()
    except LeapLLMError as e:
        die(str(e))
    if not path.is_file() or path.suffix != ".gguf":
        die(f"--model must be an existing .gguf file (transformers loads the same file), got {path}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # before loading: every system runs with the same count
    command = shlex.join([Path(sys.executable).name] + sys.argv)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    machine = machine_info(args.device)
    print(f"{date}  {machine['device_name']}  threads={machine['threads']}  torch {machine['torch']}  "
          f"transformers {machine['transformers']}", file=sys.stderr)
    if args.device == "cpu" and machine["load_average"][0] > 0.5:
        # Other busy processes make OpenMP barriers wait for a time slice: timings become noise.
        print(f"warning: load average {machine['load_average'][0]:.1f} on {machine['cores']} cores before "
              "starting; CPU timings will be noisy", file=sys.stderr)

    entries = []
    for name in args.systems:
        print(f"loading {name} ...", file=sys.stderr)
        entries.append(load_system(name, path, args.device))
        if entries[-1]["status"] != "ok":
            print(f"  {name} is missing: {entries[-1]['reason']}", file=sys.stderr)
    live = [e for e in entries if e["status"] == "ok"]
    if not live:
        die("no system could be loaded")
    context = min(e["system"].context_length for e in live)
    if max(args.prompt_lens) + 1 > context:
        die(f"--prompt-lens {max(args.prompt_lens)} (+1 cache slot) exceeds the model's context of {context} tokens")
    if args.decode_prompt_len + args.decode_tokens > context:
        die(f"--decode-prompt-len + --decode-tokens = {args.decode_prompt_len + args.decode_tokens} exceeds "
            f"the model's context of {context} tokens")

    tokenizer = next((e["system"].llm.tokenizer for e in live if e["engine"] == "leapllm"), None)
    if tokenizer is None:  # only HF systems asked for: still tokenize with leapllm's tokenizer
        from leapllm.loading.gguf_file import open_gguf
        from leapllm.tokenization import Tokenizer
        tokenizer = Tokenizer.from_gguf_metadata(open_gguf(path)[1])
    keys = [f"prefill@{n}" for n in args.prompt_lens] + ["decode"]
    inputs = {f"prefill@{n}": prompt_ids(tokenizer, n) for n in args.prompt_lens}
    inputs["decode"] = prompt_ids(tokenizer, args.decode_prompt_len)

    with torch.inference_mode():
        # Round 0 is the untimed warm-up; then each repeat runs every system in turn, per figure.
        for rnd in range(args.repeats + 1):
            print("warm-up" if rnd == 0 else f"repeat {rnd}/{args.repeats}", file=sys.stderr)
            for key in keys:
                for e in entries:
                    if e["status"] != "ok":
                        continue
                    try:
                        run = measure(e, key, inputs[key], args.decode_tokens, args.device)
                    except Exception as exc:  # noqa: BLE001 - a failed system is reported, not timed
                        e.update(status="failed", reason=f"{key}: {type(exc).__name__}: {exc}".splitlines()[0])
                        continue
                    if rnd == 0:
                        e["warmup"][key] = run
                    else:
                        e["runs"].setdefault(key, []).append(run)

        reference = next((e for e in entries if e["name"] == REFERENCE and e["status"] == "ok"), None)
        if reference is not None:
            ref_tokens = reference["decode_tokens"][0]
        else:  # the reference was not benchmarked: load it just for its greedy tokens
            print(f"loading {REFERENCE} for the quality check ...", file=sys.stderr)
            ref = LeapSystem(path, "float32", args.device)
            ref_tokens = ref.decode(inputs["decode"], args.decode_tokens)[1]
            del ref
    check_quality(entries, ref_tokens, args.decode_tokens)

    for e in entries:
        e["median"] = median_figures(e)
        e.pop("system", None)  # the JSON holds figures, not models
    tables, ratios = table_rows(entries, keys, args.decode_tokens)
    memory_note = ("GPU memory: resident weights + peak working memory" if args.device == "cuda"
                   else "memory: RSS growth of the process while loading the system")
    title = (f"leapllm vs transformers, {path.name}, {machine['device_name']}, threads={machine['threads']}, "
             f"decode {args.decode_tokens} tokens after {args.decode_prompt_len}, median of {args.repeats}")
    print_tables(tables, title)
    print(memory_note)
    for e in entries:
        if e["status"] == "ok" and not e["weights"]["format"].startswith("dense"):
            print(f"note: {e['name']} ran with {e['weights']['format']}, not dequantized weights")

    if args.markdown:
        header_line = f"{date} · {machine['device_name']} ({machine['cores']} cores, threads={machine['threads']}, " \
                      f"torch {machine['torch']}, transformers {machine['transformers']}) · `{command}`\n\n" \
                      f"{title}. {memory_note}."
        Path(args.markdown).write_text(markdown(tables, header_line) + "\n", encoding="utf-8")
    if args.json:
        for e in entries:
            e["decode_tokens"] = e["decode_tokens"][:1]  # one copy is enough once checked
        report = {"date": date, "command": command, "machine": machine, "model": path.name,
                  "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "model")},
                  "memory_note": memory_note, "load_average_at_end": os.getloadavg(),
                  "peak_rss_mib": (proc_status_kib("VmHWM") or 0) / 1024,
                  "reference_tokens": ref_tokens, "systems": entries, "ratios": ratios}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 1 if any(e["status"] in ("broken", "failed") for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main())
