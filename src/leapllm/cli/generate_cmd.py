"""`leapllm generate`, `leapllm chat` and `leapllm info`: the model at work on the terminal.

    leapllm generate "The capital of France is" [--chat] [--stats] [--max-tokens 256] [--temperature 0.8] ...
    leapllm chat [--system TEXT] [--stats]          # /reset clears the conversation, /exit or Ctrl-D quits
    leapllm info [--json]
"""

from __future__ import annotations

import json
import sys

from leapllm.cli import common
from leapllm.cli.args import add_model_args, add_sampling_args, add_speculative_args, sampling_from_args
from leapllm.cli.common import print_stats, write_stdout


def add_generation_args(p, max_tokens: int) -> None:
    """What `generate` and `chat` share: --stats, the model, sampling and speculative flags."""
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    add_model_args(p)
    add_sampling_args(p, max_tokens=max_tokens)
    add_speculative_args(p)


def add_generate_parsers(subparsers) -> None:
    """Add `generate`, `chat` and `info` to the `leapllm` parser's subparsers."""
    p = subparsers.add_parser("generate", help="complete a prompt, streaming the text")
    p.add_argument("prompt", help="prompt text, or - to read it from stdin")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_generation_args(p, max_tokens=256)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("chat", help="interactive chat with the model's chat template")
    p.add_argument("--system", default=None, help="system prompt")
    add_generation_args(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser("info", help="model facts: architecture, shapes, parameters, bytes by dtype")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_args(p)
    p.set_defaults(func=cmd_info)


def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = sampling_from_args(args)
    llm = common.load_llm(args)
    if args.chat:
        ids = llm.encode_chat([{"role": "user", "content": prompt}])
    else:
        ids = llm.encode(prompt)
    out = llm.run(ids, params, prompt=prompt, on_text=write_stdout)
    sys.stdout.write("\n")
    if args.stats:
        print_stats(out, speculation=llm.speculation_stats)
    return 0


def cmd_chat(args) -> int:
    params = sampling_from_args(args)
    llm = common.load_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"leapllm chat with {llm.config.name or llm.path.name}. /reset clears the conversation, "
              "/exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("\n> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:  # EOF
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        out = llm.run(llm.encode_chat(messages), params, prompt=line, on_text=write_stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.stats:
            print_stats(out, speculation=llm.speculation_stats)
        messages.append({"role": "assistant", "content": out.text})


def cmd_info(args) -> int:
    llm = common.load_llm(args)
    info = llm.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{info['name'] or info['path']}", show_header=False)
    for key in ("path", "architecture", "layers", "hidden_size", "intermediate_size", "heads", "kv_heads",
                "head_dim", "vocab_size", "context_length", "rope_theta", "tied_embeddings", "device"):
        table.add_row(key, str(info[key]))
    for switch, what in info["family"].items():  # what the blocks do beyond Llama's
        table.add_row(switch, what)
    table.add_row("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f} M)")
    for dtype, row in info["stored_dtypes"].items():
        table.add_row(f"stored {dtype}", f"{row['tensors']} tensors, {row['params']:,} params, "
                      f"{row['bytes'] / 2**20:.1f} MiB")
    for dtype, how in info["kernels_by_type"].items():  # what each stored type runs on
        table.add_row(f"runs {dtype} on", ", ".join(how))
    if info["many_rows_kernel"]:
        table.add_row("prefill runs on", info["many_rows_kernel"])
    for dtype, nbytes in info["memory_bytes_by_dtype"].items():
        table.add_row(f"in memory {dtype}", f"{nbytes / 2**20:.1f} MiB")
    table.add_row("load time", f"{llm.load_seconds:.1f} s")
    Console().print(table)
    return 0
