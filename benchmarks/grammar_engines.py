"""llguidance next to xgrammar on leapllm's tokenizer: setup, compile time, per-token mask time, coverage.

    .venv/bin/python benchmarks/grammar_engines.py [--json out.json] [--markdown out.md]

xgrammar is a benchmark-only peer (`pip install --no-deps xgrammar apache-tvm-ffi`: its declared
dependencies pull transformers and triton, which the CPU path never imports). For each engine:
  - setup: building its view of the default model's vocabulary (once per model);
  - compile: each schema of leapllm.evaluation.json_schemas, compiled alone (p50 and max);
  - mask: the time to fill one token's mask, walking the token path that leapllm's constrained greedy
    decoding produced for each schema (so both engines see the same, valid, real tokens);
  - coverage: which of the suite's schemas, and of a set of harder keywords, each compiles, refuses
    (leapllm answers 400), or accepts while ignoring a keyword (xgrammar warns on stderr and then
    lets outputs through that break it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time

import torch

HARD_SCHEMAS = {
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "minProperties": {"type": "object", "minProperties": 2},
    "patternProperties": {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}},
    "format uri": {"type": "string", "format": "uri"},
    "format date-time": {"type": "string", "format": "date-time"},
    "pattern lookahead": {"type": "string", "pattern": "^(?=.*[0-9])[a-z0-9]{4,8}$"},
    "recursive $ref": {"$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["value"]}}, "$ref": "#/$defs/node"},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                        {"required": ["a"]}]},
    "if/then": {"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
    "not": {"not": {"type": "string"}},
    "multipleOf": {"type": "integer", "multipleOf": 5},
}


def ms(seconds: float) -> float:
    return seconds * 1000.0


@contextlib.contextmanager
def native_stderr():
    """What native code writes to file descriptor 2 inside the block (xgrammar warns there when it
    drops a keyword it cannot enforce), as the list the block gets."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read())


def clean(message: str) -> str:
    """An engine's message without its timestamp and source location."""
    return re.sub(r"\[[0-9:]+\] \S+:\d+: ", "", message).strip().splitlines()[0][:90]


def compile_checked(eng, schema: dict):
    """(compiled, None) or (compiled, the warning of a keyword it ignores); raises if it refuses."""
    with native_stderr() as err:
        compiled = eng.compile(schema)
    warnings = [line for line in err[0].splitlines() if "Warning" in line]
    return compiled, (clean(warnings[0]) if warnings else None)


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance
        from llguidance import LLMatcher, LLTokenizer

        from leapllm.engine.structured_output import JSON_OPTIONS

        self.version = llguidance.__version__
        self.LLMatcher, self.options, self.words = LLMatcher, JSON_OPTIONS, (vocab_size + 31) // 32
        start = time.perf_counter()
        self.tok = LLTokenizer(tokenizer.backend_json(), n_vocab=vocab_size, eos_token=sorted(tokenizer.stop_token_ids))
        self.setup_s = time.perf_counter() - start

    def compile(self, schema: dict):
        grammar = self.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=self.options)
        m = self.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error().splitlines()[0])
        return m

    def mask_times(self, compiled, tokens: list[int]) -> list[float]:
        mask = torch.empty(self.words, dtype=torch.int32)
        times = []
        for t in tokens:
            start = time.perf_counter()
            compiled.unsafe_compute_mask_ptr(mask.data_ptr(), self.words * 4)
            times.append(time.perf_counter() - start)
            assert compiled.consume_token(t), "llguidance refused a token of a valid output"
        return times


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int):
        import importlib.metadata

        import xgrammar

        self.xgr, self.version = xgrammar, importlib.metadata.version("xgrammar")
        start = time.perf_counter()
        vocab = [tokenizer.id_to_token(i) or "" for i in range(vocab_size)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
                                      stop_token_ids=sorted(tokenizer.stop_token_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.setup_s = time.perf_counter() - start
        self.vocab_size = vocab_size

    def compile(self, schema: dict):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                     separators=(", ", ": "))
        return self.xgr.GrammarMatcher(compiled)

    def mask_times(self, matcher, tokens: list[int]) -> list[float]:
        mask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        times = []
        for t in tokens:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - start)
            assert matcher.accept_token(t), "xgrammar refused a token of a valid output"
        return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--markdown", metavar="OUT")
    p.add_argument("--threads", type=int, default=1, help="torch threads while walking (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from leapllm.engine.sampling import SamplingParams
    from leapllm.engine.structured_output import StructuredOutputParams
    from leapllm.evaluation.json_schemas import SCHEMAS, schema_prompt
    from leapllm.llm import LLM
    from leapllm.profiling.machine import device_name

    llm = LLM()
    vocab_size = llm.config.vocab_size
    # The token paths: leapllm's own constrained greedy outputs (each one valid for its schema).
    paths = {}
    for name, schema in SCHEMAS.items():
        out = llm.chat(schema_prompt(name), SamplingParams(max_tokens=160, temperature=0.0,
                                                           structured_output=StructuredOutputParams(json=schema)))
        paths[name] = [t for t in out.token_ids if t not in llm.tokenizer.stop_token_ids]

    engines = []
    for cls in (Llguidance, Xgrammar):
        try:
            engines.append(cls(llm.tokenizer, vocab_size))
        except ImportError as exc:
            print(f"{cls.name}: not installed ({exc}); skipped", file=sys.stderr)
    results = []
    for eng in engines:
        compile_s, mask_s, failures, ignored = [], [], {}, {}
        for name, schema in SCHEMAS.items():
            start = time.perf_counter()
            try:
                compiled, warning = compile_checked(eng, schema)
            except Exception as exc:  # noqa: BLE001 - an engine's refusal is a coverage result
                failures[name] = clean(str(exc))
                continue
            compile_s.append(time.perf_counter() - start)
            if warning:
                ignored[name] = warning
            mask_s += eng.mask_times(compiled, paths[name])
        hard = {}
        for name, schema in HARD_SCHEMAS.items():
            try:
                _, warning = compile_checked(eng, schema)
                hard[name] = f"compiles, ignoring: {warning}" if warning else "compiles"
            except Exception as exc:  # noqa: BLE001
                hard[name] = "refused: " + clean(str(exc))
        mask_sorted = sorted(mask_s)
        results.append({
            "engine": eng.name, "version": eng.version, "setup_ms": ms(eng.setup_s),
            "compile_ms_p50": ms(statistics.median(compile_s)), "compile_ms_max": ms(max(compile_s)),
            "mask_us_p50": ms(statistics.median(mask_s)) * 1000,
            "mask_us_p99": ms(mask_sorted[int(0.99 * (len(mask_sorted) - 1))]) * 1000,
            "mask_us_max": ms(mask_sorted[-1]) * 1000, "tokens_walked": len(mask_s),
            "suite_enforced": f"{len(SCHEMAS) - len(failures) - len(ignored)}/{len(SCHEMAS)}",
            "suite_failures": failures, "suite_ignored": ignored,
            "hard_schemas": hard,
        })
    report = {"machine": device_name(torch.device("cpu")), "vocab_size": vocab_size, "threads": args.threads,
              "schemas": len(SCHEMAS), "results": results}
    lines = [f"Grammar engines on the default model's tokenizer ({vocab_size} tokens), {report['machine']}, "
             f"{args.threads} thread(s); {len(SCHEMAS)} schemas.", "",
             "| engine | setup ms | compile p50 ms | compile max ms | mask p50 µs | mask p99 µs | mask max µs "
             "| suite compiled, no keyword ignored |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['engine']} {r['version']} | {r['setup_ms']:.0f} | {r['compile_ms_p50']:.2f} | "
                     f"{r['compile_ms_max']:.2f} | {r['mask_us_p50']:.0f} | {r['mask_us_p99']:.0f} | "
                     f"{r['mask_us_max']:.0f} | {r['suite_enforced']} |")
    for r in results:
        for name, warning in r["suite_ignored"].items():
            lines.append(f"\n{r['engine']} on `{name}`: {warning}")
    lines += ["", "| keyword | " + " | ".join(r["engine"] for r in results) + " |",
              "|---|" + "---|" * len(results)]
    for name in HARD_SCHEMAS:
        lines.append(f"| {name} | " + " | ".join(r["hard_schemas"][name] for r in results) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
