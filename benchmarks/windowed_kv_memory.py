"""KV-cache memory of a model whose layers mix sliding windows and full attention (Gemma 2 / 3).

    .venv/bin/python benchmarks/windowed_kv_memory.py MODEL [--kv-cache-gb 1] [--max-num-seqs 32]
        [--tokens 1500] [--json out.json]

Reports the two pools the serving engine makes for such a model (engine/scheduler.py's KV groups):
the full layers' and the windowed layers', against the equal pools every layer got before; then
greedy-decodes one sequence of --tokens and reports the most blocks it held in each pool, and the
KV bytes that makes, against what keeping every block in every layer would hold. Counts, not times.
"""

from __future__ import annotations

import argparse
import json

from leapllm import LLM
from leapllm.config import EngineConfig
from leapllm.engine.llm_engine import LLMEngine
from leapllm.engine.sampling import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    llm = LLM(args.model)
    c = llm.config
    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_gb=args.kv_cache_gb,
                                                              max_num_seqs=args.max_num_seqs))
    groups = engine.scheduler.groups
    if len(groups) != 2:
        raise SystemExit(f"{c.architecture}: no mix of windowed and full layers, so one pool")
    full, windowed = groups
    bs = engine.config.block_size
    block = engine.runner.cache.k[0][:bs].nbytes * 2  # keys and values of one layer's block
    num_windowed = len(c.windowed_layers)
    num_full = c.num_layers - num_windowed
    ids = llm.tokenizer.encode("Write a long story about the sea.")
    engine.add_request("0", ids, SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True))
    most_full = most_windowed = 0
    while engine.has_unfinished():
        engine.step()
        most_full = max(most_full, full.allocator.num_used)
        most_windowed = max(most_windowed, windowed.allocator.num_used)
    mib = 2**20
    report = {
        "model": llm.path.name, "layers": c.num_layers, "windowed_layers": num_windowed, "window": c.sliding_window,
        "block_size": bs, "kv_cache_gb": args.kv_cache_gb, "max_num_seqs": args.max_num_seqs,
        "full_pool_blocks": full.allocator.num_blocks, "windowed_pool_blocks": windowed.allocator.num_blocks,
        "equal_pool_blocks": int(args.kv_cache_gb * 2**30 // (block * c.num_layers)),
        "positions": len(ids) + args.tokens, "most_full_blocks": most_full, "most_windowed_blocks": most_windowed,
        "kv_held_mib": (most_full * num_full + most_windowed * num_windowed) * block / mib,
        "kv_every_block_mib": most_full * c.num_layers * block / mib,
    }
    print(f"{report['model']}: {c.num_layers} layers, {num_windowed} windowed ({c.sliding_window} keys), "
          f"blocks of {bs}, {args.kv_cache_gb:g} GB of KV cache for {args.max_num_seqs} sequences")
    print(f"  pools: full layers {report['full_pool_blocks']} blocks, windowed layers "
          f"{report['windowed_pool_blocks']}; equal pools would give each {report['equal_pool_blocks']}")
    print(f"  one sequence at {report['positions']} positions held at most {most_full} full and {most_windowed} "
          f"windowed blocks: {report['kv_held_mib']:.1f} MiB of KV (every block kept: "
          f"{report['kv_every_block_mib']:.1f} MiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
