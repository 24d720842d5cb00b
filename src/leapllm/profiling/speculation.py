"""What speculative decoding does on one prompt: acceptance, and where its time goes.

`leapllm profile --speculative ngram` (or `--draft-model PATH`) runs, after the stage profile, the
same prompt twice through a single-sequence engine (what `LLM.run` uses), greedy: once plainly
and once speculating, and reports the proposals' acceptance rate, the tokens each verification
step emits, the mean time of proposing, of a verification pass (k + 1 positions through the
target) and of a plain step, and the decode speed of both runs. Greedy output must be identical;
it is checked here too.
"""

from __future__ import annotations

import time

import torch

from leapllm.engine.llm_engine import LLMEngine, single_sequence_config
from leapllm.engine.sampling import SamplingParams


def _decode(model, tokenizer, ids, gen_len, speculative, stats):
    """Greedy tokens, decode seconds after the first token, seconds to the first token; `stats`
    (a dict, or None) gets what speculation did."""
    params = SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)
    engine = LLMEngine(model, tokenizer, single_sequence_config(model.config.context_length, speculative))
    first = None
    tokens = []
    start = time.perf_counter()
    for out in engine.stream("profile", ids, params):
        if first is None:
            first = time.perf_counter()
        tokens.extend(out.new_token_ids)
    end = time.perf_counter()
    if stats is not None:
        stats.update(proposed=engine.num_spec_proposed, accepted=engine.num_spec_accepted,
                     speculative_steps=engine.num_spec_steps, plain_steps=engine.num_plain_steps,
                     **engine.spec_seconds)
    return tokens, end - first, first - start


@torch.inference_mode()
def profile_speculation(model, tokenizer, speculative, prompt_ids: list[int], gen_len: int) -> dict:
    """JSON-ready facts of one plain and one speculative greedy decode of gen_len tokens after prompt_ids."""
    _decode(model, tokenizer, prompt_ids, min(gen_len, 8), None, None)  # warm-up
    plain, plain_s, _ = _decode(model, tokenizer, prompt_ids, gen_len, None, None)
    stats: dict = {}
    spec, spec_s, _ = _decode(model, tokenizer, prompt_ids, gen_len, speculative, stats)
    steps = stats.get("speculative_steps", 0)
    plain_steps = stats.get("plain_steps", 0)
    proposed, accepted = stats.get("proposed", 0), stats.get("accepted", 0)
    return {
        "method": speculative.method,
        "num_speculative_tokens": speculative.num_speculative_tokens,
        "adaptive": speculative.adaptive,
        "gen_len": gen_len,
        "identical_to_plain": spec == plain,
        "proposed_tokens": proposed,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "verification_steps": steps,
        "plain_steps": plain_steps,
        "tokens_per_verification": (accepted + steps) / steps if steps else 0.0,
        "verify_ms": 1000 * stats.get("verify_s", 0.0) / steps if steps else None,
        "propose_ms": 1000 * stats.get("propose_s", 0.0) / max(steps + plain_steps, 1),
        "plain_step_ms": 1000 * stats.get("plain_s", 0.0) / plain_steps if plain_steps else None,
        "plain_decode_tokens_per_s": (len(plain) - 1) / plain_s if plain_s > 0 else 0.0,
        "speculative_decode_tokens_per_s": (len(spec) - 1) / spec_s if spec_s > 0 else 0.0,
    }


def describe(s: dict) -> str:
    """The profile's printed lines about speculation."""
    def ms(v):
        return "n/a" if v is None else f"{v:.2f} ms"

    speedup = s["speculative_decode_tokens_per_s"] / s["plain_decode_tokens_per_s"] if s[
        "plain_decode_tokens_per_s"] else 0.0
    return (f"speculative decoding ({s['method']}, up to {s['num_speculative_tokens']} tokens a step"
            f"{', adaptive' if s['adaptive'] else ''}), {s['gen_len']} greedy tokens:\n"
            f"  {s['accepted_tokens']} of {s['proposed_tokens']} proposed tokens kept ({s['acceptance_rate']:.0%}), "
            f"{s['tokens_per_verification']:.2f} tokens per verification step ({s['verification_steps']} steps; "
            f"{s['plain_steps']} plain steps)\n"
            f"  verification pass {ms(s['verify_ms'])}, plain step {ms(s['plain_step_ms'])}, "
            f"proposing {ms(s['propose_ms'])} a step\n"
            f"  decode {s['speculative_decode_tokens_per_s']:.1f} tok/s against {s['plain_decode_tokens_per_s']:.1f} "
            f"plain ({speedup:.2f}x); output {'identical to' if s['identical_to_plain'] else 'DIFFERENT from'} plain")
