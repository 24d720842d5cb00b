"""Translation requests of different lengths: leapllm's batching engine against transformers' generate()
in fixed batches, same run.

    python benchmarks/seq2seq_batching.py --model opus-mt-en-de --requests 64 --lengths 8-64 --batch 16 \
        --threads 2 --out benchmarks/seq2seq-batching-cpu.json

N requests arrive together, each a random 33-token source asking for its own number of new tokens
(drawn from --lengths; EOS forbidden until then, so random weights give exactly that many). This is
what continuous batching is for: transformers' generate() runs --batch requests at a time in arrival
order, and a batch runs as long as its longest request (every row to that length, the extra tokens
cut off afterwards), as a server that batches requests statically does; leapllm's engine holds at
most --batch running sequences too (max_num_seqs), but a request leaves the batch when it has its
tokens and the next one joins at the next step. tokens/s = requested tokens / wall time of the whole
run, encoders included; warm-up, then the median of --repeats. The model is seq2seq_speed.py's
(transformers' own, full size, seeded random weights); leapllm runs float32 (the same arithmetic as
transformers) and `--int8`. Each leapllm request's tokens are checked against transformers' row for
it, but for its last: a model with forced_eos_token_id (Marian) ends a request on it at the
request's own length, and transformers' row only at its batch's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from seq2seq_speed import CONFIGS, write_folder

from leapllm.benchmarking.timing import median_seconds
from leapllm.profiling.machine import device_name


def run_engine(lm, sources: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """Every request on the engine at once, each with its own length."""
    from leapllm.engine.seq2seq import Seq2SeqParams, engine_request, plan_generation

    engine = lm.engine
    tokens: dict[str, list[int]] = {}
    for i, (ids, n) in enumerate(zip(sources, lengths, strict=True)):
        plan = plan_generation(Seq2SeqParams(max_new_tokens=n, min_length=n + 1, num_beams=1,
                                             no_repeat_ngram_size=0), lm.defaults, lm.model)
        r = engine_request(plan)
        engine.add_request(str(i), r.prompt_ids, r.params, encoder_ids=ids, logits_processor=r.logits_processor)
        tokens[str(i)] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[str(i)] for i in range(len(sources))]


def run_static(ref, sources: list[list[int]], lengths: list[int], batch: int, pad: int) -> list[list[int]]:
    """transformers' generate() on consecutive batches, each to its longest request's length."""
    out = []
    for start in range(0, len(sources), batch):
        part, want = sources[start:start + batch], lengths[start:start + batch]
        width = max(len(s) for s in part)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in part])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in part])
        longest = max(want)
        rows = ref.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, num_beams=1,
                            do_sample=False, no_repeat_ngram_size=0)
        out += [row[1:1 + n].tolist() for row, n in zip(rows, want, strict=True)]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="opus-mt-en-de", choices=list(CONFIGS))
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--lengths", default="8-64", help="new tokens per request: uniform in LO-HI")
    p.add_argument("--batch", type=int, default=16, help="transformers' batch size and leapllm's max_num_seqs")
    p.add_argument("--source-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from leapllm.config import EngineConfig
    from leapllm.engine.seq2seq_lm import Seq2SeqLM

    lo, hi = (int(x) for x in args.lengths.split("-"))
    gen = torch.Generator().manual_seed(0)
    cfg = CONFIGS[args.model]
    draws = torch.randint(3, cfg["vocab_size"] - 1, (args.requests, args.source_len), generator=gen).tolist()
    sources = [[t for t in row if t not in (cfg["pad_token_id"], cfg["eos_token_id"])] + [cfg["eos_token_id"]]
               for row in draws]
    lengths = torch.randint(lo, hi + 1, (args.requests,), generator=gen).tolist()
    total = sum(lengths)
    row = {"model": args.model, "requests": args.requests, "lengths": args.lengths, "batch": args.batch,
           "requested_tokens": total}
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        folder = Path(tmp) / args.model
        ref = write_folder(args.model, folder)
        config = EngineConfig(max_num_seqs=args.batch)
        systems = {"leapllm": Seq2SeqLM(folder, engine_config=config),
                   "leapllm-int8": Seq2SeqLM(folder, quantize="int8", engine_config=config)}

        def static():
            outputs["transformers"] = run_static(ref, sources, lengths, args.batch, cfg["pad_token_id"])

        row["transformers_tokens_per_s"] = total / median_seconds(static, args.repeats)
        for name, lm in systems.items():
            def engine(lm=lm, name=name):
                outputs[name] = run_engine(lm, sources, lengths)

            row[f"{name}_tokens_per_s"] = total / median_seconds(engine, args.repeats)
            row[f"{name}_ratio"] = row[f"{name}_tokens_per_s"] / row["transformers_tokens_per_s"]
            row[f"{name}_tokens_equal_to_transformers"] = sum(
                next((i for i, (a, b) in enumerate(zip(ours[:-1], theirs[:-1], strict=True)) if a != b),
                     len(ours) - 1)
                for ours, theirs in zip(outputs[name], outputs["transformers"], strict=True))
    compared = total - args.requests
    row["tokens_compared"] = compared
    print(f"{args.model}, {args.requests} requests of {args.lengths} tokens ({total}), batches of {args.batch}: "
          f"transformers {row['transformers_tokens_per_s']:.1f} tok/s; "
          + "; ".join(f"{s} {row[f'{s}_tokens_per_s']:.1f} tok/s ({row[f'{s}_ratio']:.2f}x, "
                      f"{row[f'{s}_tokens_equal_to_transformers']}/{compared} tokens equal)" for s in systems))
    result = {"cpu": device_name(torch.device("cpu")), "threads": args.threads, "torch": torch.__version__,
              "transformers": transformers.__version__, "rows": [row]}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
