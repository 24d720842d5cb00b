"""Sentence-embedding speed: leapllm (float32, int8) against transformers and sentence-transformers,
in one run, on the same sentences, at batch 1 and batch 32.

    .venv/bin/python benchmarks/embeddings.py [--model FOLDER] [--sentences 256] [--repeats 3]
        [--json benchmarks/embeddings-cpu.json] [--markdown benchmarks/embeddings-cpu.md]

Sentences: the sentences of the docstrings and comments of Python's own argparse module (real
text the project did not write, 3 to 120 words), shuffled with a fixed seed. Each system embeds all
of them one at a time (batch 1) and in batches of 32 (its own batching: leapllm sorts by length;
transformers and sentence-transformers pad each batch of 32 in the given order, except that
sentence-transformers also sorts by length internally). Systems run interleaved, after a warm-up,
and the median of the repeats is kept. Every system's vectors are checked against leapllm float32
(cosine), so a fast but wrong system shows up.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import re
import statistics
import sys
import time

import numpy as np
import torch


def sentences(count: int, seed: int = 0) -> list[str]:
    text = inspect.getsource(argparse)
    parts = re.split(r"(?<=[.!?])\s+|\n\s*\n", re.sub(r"[ \t]*#[ \t]*|\"\"\"", " ", text))
    found = [" ".join(p.split()) for p in parts]
    found = [s for s in found if 3 <= len(s.split()) <= 120 and re.search(r"[a-z]{3}", s)]
    random.Random(seed).shuffle(found)
    return (found * (count // max(len(found), 1) + 1))[:count]


class LeapSystem:
    def __init__(self, folder, quantize=None):
        from leapllm.encoders.embedder import Embedder

        self.embedder = Embedder(folder, quantize=quantize)
        self.name = "leapllm-int8" if quantize else "leapllm-float32"

    def embed(self, texts, batch_size):
        self.embedder.max_batch_size = batch_size
        return self.embedder.embed(texts)


class HFSystem:
    name = "transformers-float32"

    def __init__(self, folder):
        from transformers import AutoModel, AutoTokenizer

        self.tok, self.model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    @torch.inference_mode()
    def embed(self, texts, batch_size):
        out = []
        for i in range(0, len(texts), batch_size):
            b = self.tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = self.model(**b).last_hidden_state
            m = b["attention_mask"][:, :, None].float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1))
        return torch.cat(out).numpy()


class STSystem:
    name = "sentence-transformers"

    def __init__(self, folder):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(folder, device="cpu")

    def embed(self, texts, batch_size):
        return self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True)


def main() -> int:
    from leapllm.loading.encoder_loader import default_encoder_path
    from leapllm.output_files import atomic_write
    from leapllm.profiling.machine import device_name

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--batch1-sentences", type=int, default=64, help="how many of them the batch-1 runs embed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    folder = str(args.model or default_encoder_path())
    texts = sentences(args.sentences)
    systems = [LeapSystem(folder), LeapSystem(folder, "int8"), HFSystem(folder)]
    try:
        systems.append(STSystem(folder))
    except ImportError:
        print("sentence-transformers is not installed: skipped", file=sys.stderr)
    runs = {(s.name, b): [] for s in systems for b in (1, 32)}
    vectors = {}
    for s in systems:  # warm-up, and the vectors for the agreement check
        vectors[s.name] = s.embed(texts, 32)
        s.embed(texts[:4], 1)
    for _ in range(args.repeats):
        for batch, subset in ((1, texts[:args.batch1_sentences]), (32, texts)):
            for s in systems:
                start = time.perf_counter()
                s.embed(subset, batch)
                runs[(s.name, batch)].append(len(subset) / (time.perf_counter() - start))
    ref = vectors["leapllm-float32"]
    rows = []
    for s in systems:
        b1, b32 = statistics.median(runs[(s.name, 1)]), statistics.median(runs[(s.name, 32)])
        cos = float((vectors[s.name] * ref).sum(1).min())
        rows.append({"system": s.name, "batch1_sentences_per_s": b1, "batch32_sentences_per_s": b32,
                     "min_cosine_vs_leapllm_f32": cos})
    base = {r["system"]: r for r in rows}.get("sentence-transformers") or rows[2]
    for r in rows:
        r["batch1_vs_" + base["system"]] = r["batch1_sentences_per_s"] / base["batch1_sentences_per_s"]
        r["batch32_vs_" + base["system"]] = r["batch32_sentences_per_s"] / base["batch32_sentences_per_s"]
    lengths = [len(x) for x in systems[0].embedder.tokenize(texts)]
    report = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M"),
              "cpu": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
              "sentences": len(texts), "tokens_mean": float(np.mean(lengths)), "tokens_max": max(lengths),
              "baseline": base["system"], "rows": rows}
    lines = [f"| system | batch 1 sent/s | batch 32 sent/s | x {base['system']} (b1) | x {base['system']} (b32) "
             "| min cosine vs leapllm f32 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['batch1_sentences_per_s']:.1f} | {r['batch32_sentences_per_s']:.1f} | "
                     f"{r['batch1_vs_' + base['system']]:.2f} | {r['batch32_vs_' + base['system']]:.2f} | "
                     f"{r['min_cosine_vs_leapllm_f32']:.4f} |")
    md = (f"{report['cpu']}, {report['threads']} threads, {report['date']}; {len(texts)} sentences "
          f"(mean {report['tokens_mean']:.0f} tokens, max {report['tokens_max']}).\n\n" + "\n".join(lines) + "\n")
    print(md)
    if args.json:
        atomic_write(args.json, json.dumps(report, indent=2) + "\n")
    if args.markdown:
        atomic_write(args.markdown, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
