"""Milliseconds to sample one token for each row of a batch of logits, per sampling setting, as the
engine does in each step (the CLI's defaults, the API's defaults, top-p alone, seeded rows).

    PYTHONPATH=src .venv/bin/python benchmarks/sampling_speed.py [--vocab 49152] [--threads 2]

The logits are a peaked distribution like a model's (a few dozen likely tokens over a normal tail).
With a leapllm older than engine/sampling.py's `sample_rows`, each row goes through Sampler.sample,
as the engine did then: run the script from both checkouts in one shell to compare.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from leapllm.engine.sampling import Sampler, SamplingParams

try:
    from leapllm.engine.sampling import sample_rows
except ImportError:  # the per-row engine of before
    def sample_rows(samplers, logits):
        return [s.sample(row) for s, row in zip(samplers, logits)]

SETTINGS = {
    "cli defaults (t 0.8, top-k 40, top-p 0.95, min-p 0.05)": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    "api defaults (t 1)": dict(temperature=1.0),
    "top-p 0.95 alone": dict(temperature=0.8, top_p=0.95),
    "seeded, t 1": dict(temperature=1.0, seed=1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    results = []
    for name, kw in SETTINGS.items():
        for batch in map(int, args.batches.split(",")):
            logits = torch.randn(batch, args.vocab, generator=g) * 2
            logits[:, :30] += 12  # a model's peaked distribution: a few dozen tokens hold ~99% of the mass
            samplers = [Sampler(SamplingParams(**kw), [], args.vocab, torch.device("cpu")) for _ in range(batch)]
            sample_rows(samplers, logits)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                sample_rows(samplers, logits)
                times.append(time.perf_counter() - start)
            ms = 1000 * sorted(times)[len(times) // 2]
            results.append({"setting": name, "batch": batch, "ms": round(ms, 3)})
            print(f"{name:56s} b{batch:<3d} {ms:8.2f} ms")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
