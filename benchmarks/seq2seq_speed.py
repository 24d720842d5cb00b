"""Translation speed: leapllm's encoder-decoder generation against transformers' `generate()`, same run.

    python benchmarks/seq2seq_speed.py --models opus-mt-en-de,t5-small --batches 1,16 --new-tokens 64 \
        --threads 2 --out benchmarks/seq2seq-speed-cpu.json

Each model is transformers' own, built from the real config (full size: opus-mt-en-de's 6+6 layers
of 512 and 58,101 tokens; t5-small's 6+6 layers and 32,128 tokens) with seeded random weights and
saved as a folder that leapllm loads. Random weights would stop at any EOS, so both sides generate
exactly --new-tokens tokens per source (EOS forbidden until then: transformers' min_new_tokens,
leapllm's min_length) from the same random source ids, greedily (--num-beams 1) or with beams.
A warm-up generation precedes the timed repeats; the median repeat counts. tokens/s = generated
tokens (all sources of the batch) / wall time of the whole generate call, encoder included.
Systems: leapllm (float32, as stored), leapllm-int8 (`--int8`: int8 decoder weights on leapllm's
kernels) and transformers (float32). Each row also counts, per source, the tokens a leapllm system
generates before its first difference from transformers' (float32 should agree on all of them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from leapllm.benchmarking.timing import median_seconds
from leapllm.profiling.machine import device_name

CONFIGS = {
    "opus-mt-en-de": {
        "activation_function": "swish", "architectures": ["MarianMTModel"], "bad_words_ids": [[58100]],
        "bos_token_id": 0, "d_model": 512, "decoder_attention_heads": 8, "decoder_ffn_dim": 2048,
        "decoder_layers": 6, "decoder_start_token_id": 58100, "decoder_vocab_size": 58101,
        "encoder_attention_heads": 8, "encoder_ffn_dim": 2048, "encoder_layers": 6, "eos_token_id": 0,
        "forced_eos_token_id": 0, "is_encoder_decoder": True, "max_length": 512, "max_position_embeddings": 512,
        "model_type": "marian", "normalize_before": False, "normalize_embedding": False, "num_beams": 4,
        "num_hidden_layers": 6, "pad_token_id": 58100, "scale_embedding": True,
        "share_encoder_decoder_embeddings": True, "static_position_embeddings": True, "vocab_size": 58101,
    },
    "t5-small": {
        "architectures": ["T5ForConditionalGeneration"], "d_ff": 2048, "d_kv": 64, "d_model": 512,
        "decoder_start_token_id": 0, "eos_token_id": 1, "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06,
        "model_type": "t5", "n_positions": 512, "num_heads": 8, "num_layers": 6, "pad_token_id": 0,
        "relative_attention_num_buckets": 32, "vocab_size": 32128,
    },
}


def write_folder(name: str, folder: Path):
    """transformers' model of `name` with seeded random weights, saved with a word-level tokenizer.json
    over its vocabulary (the benchmark feeds token ids; leapllm's loader wants a tokenizer)."""
    import transformers
    from tokenizers import Tokenizer, models

    raw = dict(CONFIGS[name])
    config = transformers.AutoConfig.for_model(**raw)
    torch.manual_seed(0)
    cls = transformers.MarianMTModel if raw["model_type"] == "marian" else transformers.T5ForConditionalGeneration
    model = cls(config).eval()
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(raw["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="t1")).save(str(folder / "tokenizer.json"))
    return model


def bench_batch(name: str, systems: dict, ref, sources: list[list[int]], new_tokens: int, num_beams: int,
                repeats: int) -> dict:
    """One batch: each leapllm system (name -> Seq2SeqLM) and transformers, timed on the same sources."""
    from leapllm.engine.seq2seq import Seq2SeqParams, plan_generation

    params = Seq2SeqParams(max_new_tokens=new_tokens, min_length=new_tokens + 1, num_beams=num_beams,
                           no_repeat_ngram_size=0, early_stopping=True)
    first = next(iter(systems.values()))
    plan = plan_generation(params, first.defaults, first.model)
    width = max(len(s) for s in sources)
    input_ids = torch.tensor([s + [plan.pad_token_id] * (width - len(s)) for s in sources])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sources])
    tokens = len(sources) * new_tokens
    row = {"model": name, "batch": len(sources), "num_beams": num_beams, "new_tokens": new_tokens,
           "source_tokens_max": width}
    outputs = {}
    for system, lm in systems.items():
        def ours_call(lm=lm, system=system):
            with torch.inference_mode():
                outputs[system] = lm.run_on_engine(sources, plan).token_ids
            assert all(len(t) == new_tokens for t in outputs[system])

        row[f"{system}_tokens_per_s"] = tokens / median_seconds(ours_call, repeats)

    def ref_call():
        with torch.inference_mode():
            out = ref.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, num_beams=num_beams, do_sample=False,
                               no_repeat_ngram_size=0, early_stopping=True)
        assert out.shape[1] == new_tokens + 1, out.shape
        outputs["transformers"] = out[:, 1:].tolist()

    row["transformers_tokens_per_s"] = tokens / median_seconds(ref_call, repeats)
    for system in systems:
        row[f"{system}_ratio"] = row[f"{system}_tokens_per_s"] / row["transformers_tokens_per_s"]
        # Quality: the tokens generated before the first that differs from transformers', per source.
        row[f"{system}_common_prefix_with_transformers"] = [
            next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), new_tokens)
            for ours, theirs in zip(outputs[system], outputs["transformers"], strict=True)]
    print(f"{name} b{len(sources)} beams {num_beams}: transformers {row['transformers_tokens_per_s']:.1f} tok/s; "
          + "; ".join(f"{s} {row[f'{s}_tokens_per_s']:.1f} tok/s ({row[f'{s}_ratio']:.2f}x, agrees for "
                      f"{sum(row[f'{s}_common_prefix_with_transformers'])}/{tokens} tokens)" for s in systems),
          flush=True)
    return row


def bench_model(name: str, batches: list[int], new_tokens: int, source_len: int, num_beams: int,
                repeats: int) -> list[dict]:
    from leapllm.engine.seq2seq_lm import Seq2SeqLM

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / name
        ref = write_folder(name, folder)
        systems = {"leapllm": Seq2SeqLM(folder, dtype="float32", device="cpu"),
                   "leapllm-int8": Seq2SeqLM(folder, dtype="float32", device="cpu", quantize="int8")}
        vocab = CONFIGS[name]["vocab_size"]
        pad = CONFIGS[name]["pad_token_id"]
        eos = CONFIGS[name]["eos_token_id"]
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            draws = torch.randint(3, vocab - 1, (batch, source_len), generator=gen).tolist()
            sources = [[t for t in row if t not in (pad, eos)] + [eos] for row in draws]
            rows.append(bench_batch(name, systems, ref, sources, new_tokens, num_beams, repeats))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="opus-mt-en-de,t5-small")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--source-len", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the rows and the machine as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    rows = []
    for name in args.models.split(","):
        if name not in CONFIGS:
            print(f"unknown model {name!r}; known: {', '.join(CONFIGS)}", file=sys.stderr)
            return 2
        rows += bench_model(name, [int(b) for b in args.batches.split(",")], args.new_tokens, args.source_len,
                            args.num_beams, args.repeats)
    result = {"cpu": device_name(torch.device("cpu")), "threads": args.threads, "torch": torch.__version__,
              "transformers": transformers.__version__, "rows": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
