"""A profiling run: time every stage of prefill and decode, and put the analytic costs beside it.

One run is a batch of `batch` prompts of `prompt_len` real-text tokens, one prefill step, then
`gen_len` decode steps with greedy sampling (`leapllm.engine.sampling.Sampler`, one per sequence).
A step is the forward pass, sampling, and building the next step's input; its wall time is taken
with the same clock as the stages. Each step runs on the same input with the stage hooks and without
them, in alternating order (a step is idempotent: it writes the same keys and values to the same
cache slots and samples the same tokens greedily), and the fastest run of each kind is kept. With
the hooks we get the stage times and `other` = step time - sum of stages (Python, tensor glue, and
the hooks' own cost); without them we get the true step time, which is what the stages + other are
checked against.
"""

from __future__ import annotations

import gc
import math
from collections import defaultdict
from collections.abc import Callable

import torch

from leapllm.engine.sampling import Sampler, SamplingParams
from leapllm.errors import InvalidRequestError
from leapllm.model.llama import Transformer
from leapllm.profiling.costs import Cost, phase_costs, step_costs
from leapllm.profiling.stages import head_weight_bytes, kernel_stage_dtypes, quantized_weight_bytes
from leapllm.profiling.machine import MachineLimits
from leapllm.profiling.stages import (
    LAYER_STAGES,
    MEASURED_STAGES,
    OUTSIDE_LAYERS,
    STAGES,
    StageHooks,
    StageRecorder,
    clock_for,
)
from leapllm.reference_text import reference_token_ids

TOLERANCE = 0.05  # stages + other must match the hook-free step time within 5%
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
DEFAULT_SWEEP_PROMPT_LENS = (128, 256, 512, 1024, 2048, 4096)
DEFAULT_SWEEP_BATCHES = (1, 2, 4, 8, 16, 32, 64)
SWEEP_DECODE_CONTEXT = 128  # tokens cached before the timed decode steps of the batch sweep
SWEEP_DECODE_STEPS = 3  # runs of the decode step per batch size (the fastest is kept)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_run(config, prompt_len: int, gen_len: int, batch: int, repeats: int = 1) -> None:
    """Raise InvalidRequestError for values a run cannot use."""
    _positive_int("prompt_len", prompt_len)
    _positive_int("gen_len", gen_len)
    _positive_int("batch", batch)
    _positive_int("repeats", repeats)
    if prompt_len + gen_len > config.context_length:
        raise InvalidRequestError(f"prompt length {prompt_len} + generated length {gen_len} exceeds the model's "
                                  f"context length of {config.context_length} tokens")


def prompt_rows(tokenizer, prompt_len: int, batch: int, stride: int = 97) -> list[list[int]]:
    """`batch` prompts of exactly `prompt_len` tokens of real text, each starting `stride` tokens
    after the previous one (so rows differ, as real requests do)."""
    return [reference_token_ids(tokenizer, prompt_len, offset=i * stride) for i in range(batch)]


class _Stepper:
    """Runs steps (forward + greedy sampling + next input) on one model, cache and batch."""

    def __init__(self, model: Transformer, cache, rows: list[list[int]]):
        self.model, self.cache = model, cache
        self.clock = clock_for(model.device)
        self.samplers = [Sampler(SamplingParams(temperature=0.0), row, model.config.vocab_size, model.device)
                         for row in rows]

    def step(self, tokens: torch.Tensor, pos: int, recorder: StageRecorder | None = None):
        """One step; returns (seconds, next tokens (batch, 1)). With a recorder, hooks time the stages.

        The garbage collector is paused during the step (as `timeit` does): a collection would land in
        whichever run happened to cross its threshold, and registering the hooks allocates enough
        objects to make that the hooked run.
        """
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._step(tokens, pos, recorder)
        finally:
            if collecting:
                gc.enable()

    def _step(self, tokens: torch.Tensor, pos: int, recorder: StageRecorder | None):
        clock = self.clock
        clock.begin()
        if recorder is None:
            start = clock.mark()
            logits = self.model(tokens, pos, self.cache, last_only=True)
            ids = [s.sample(logits[i, -1]) for i, s in enumerate(self.samplers)]
            nxt = torch.tensor(ids, device=tokens.device).view(-1, 1)
            end = clock.mark()
        else:
            with StageHooks(self.model, recorder):
                start = clock.mark()
                logits = self.model(tokens, pos, self.cache, last_only=True)
                s0 = clock.mark()
                ids = [s.sample(logits[i, -1]) for i, s in enumerate(self.samplers)]
                recorder.add("sampling", OUTSIDE_LAYERS, s0, clock.mark())
                nxt = torch.tensor(ids, device=tokens.device).view(-1, 1)
                end = clock.mark()
        clock.synchronize()
        return clock.seconds(start, end), nxt

    def measure(self, tokens: torch.Tensor, pos: int, repeats: int, max_repeats: int, hooked_first: bool):
        """Run the step with and without hooks, in alternating order, and keep the fastest of each.

        `repeats` pairs at least; then, while the two fastest still differ by more than the tolerance
        (a busy machine slowed one of them down), more pairs, up to `max_repeats`: the minimum of each
        converges on its undisturbed time. Returns (hooked seconds, hook-free seconds,
        {(stage, layer): seconds} of the hooked run, next tokens, pairs run).
        """
        best_hooked, best_free, nxt = None, math.inf, None
        pairs = 0
        while pairs < repeats or (pairs < max_repeats and abs(best_hooked[0] - best_free) > TOLERANCE * best_free):
            order = (True, False) if (pairs % 2 == 0) == hooked_first else (False, True)
            for hooked in order:
                if hooked:
                    recorder = StageRecorder(self.clock)
                    seconds, nxt = self.step(tokens, pos, recorder)
                    stages = recorder.flush()
                    if best_hooked is None or seconds < best_hooked[0]:
                        best_hooked = (seconds, stages)
                else:
                    seconds, nxt = self.step(tokens, pos)
                    best_free = min(best_free, seconds)
            pairs += 1
        return best_hooked[0], best_free, best_hooked[1], nxt, pairs


class _Phase:
    """Sums over the steps of one phase."""

    def __init__(self):
        self.steps = 0
        self.total = 0.0  # with hooks
        self.free = 0.0  # without hooks
        self.pairs = 0  # hooked + hook-free runs of the steps (see _Stepper.measure)
        self.stage_layer: dict[tuple[str, int], float] = defaultdict(float)

    def add(self, hooked: float, free: float, stages: dict[tuple[str, int], float], pairs: int) -> None:
        self.steps += 1
        self.pairs += pairs
        self.total += hooked
        self.free += free
        for key, seconds in stages.items():
            self.stage_layer[key] += seconds


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stage_row(seconds: float, cost: Cost | None, total: float, machine: MachineLimits | None, dtype: str) -> dict:
    """One stage of one phase: time, share, analytic cost, achieved rates, fractions of peak, bound."""
    row = {"seconds": seconds, "share": seconds / total if total > 0 else 0.0}
    if cost is None:  # "other": no analytic cost
        row.update(flops=None, bytes=None, weight_bytes=None, activation_bytes=None, kv_bytes=None,
                   intensity=None, flop_per_s=None, bytes_per_s=None, peak_flops_fraction=None,
                   peak_bandwidth_fraction=None, bound=None)
        return row
    row.update(cost.to_dict())
    row["compute_dtype"] = dtype
    row["intensity"] = cost.intensity
    row["flop_per_s"] = cost.flops / seconds if seconds > 0 else None
    row["bytes_per_s"] = cost.bytes / seconds if seconds > 0 else None
    if machine is not None:
        peak = machine.peak_flops(dtype)
        row["peak_flops_fraction"] = row["flop_per_s"] / peak if row["flop_per_s"] is not None else None
        bw = row["bytes_per_s"]
        row["peak_bandwidth_fraction"] = bw / machine.bandwidth if bw is not None else None
        row["bound"] = "compute" if cost.intensity >= machine.balance(dtype) else "memory"
    else:
        row.update(peak_flops_fraction=None, peak_bandwidth_fraction=None, bound=None)
    return row


def phase_report(phase: _Phase, costs: dict[str, Cost], tokens: int, num_layers: int,
                 machine: MachineLimits | None, dtype: str, stage_dtypes: dict[str, str] | None = None) -> dict:
    """`stage_dtypes`: the stages whose matmuls run in another dtype than `dtype` (kernel_stage_dtypes)."""
    stage_dtypes = stage_dtypes or {}
    by_stage = {stage: 0.0 for stage in MEASURED_STAGES}
    for (stage, _layer), seconds in phase.stage_layer.items():
        by_stage[stage] += seconds
    measured = sum(by_stage.values())
    other = phase.total - measured
    stages = {stage: stage_row(by_stage[stage], costs.get(stage), phase.total, machine,
                               stage_dtypes.get(stage, dtype)) for stage in MEASURED_STAGES}
    stages["other"] = stage_row(other, None, phase.total, machine, dtype)
    per_layer = []
    for layer in range(num_layers):
        seconds = {stage: phase.stage_layer.get((stage, layer), 0.0) for stage in LAYER_STAGES}
        per_layer.append({"layer": layer, "seconds": seconds, "total_s": sum(seconds.values())})
    outside = {stage: phase.stage_layer[stage, OUTSIDE_LAYERS] for stage in MEASURED_STAGES
               if (stage, OUTSIDE_LAYERS) in phase.stage_layer}
    total_cost = sum(costs.values(), Cost())
    summed = measured + other
    difference = abs(summed - phase.free) / phase.free if phase.free > 0 else 0.0
    return {
        "steps": phase.steps,
        "runs_per_step": phase.pairs / phase.steps if phase.steps else 0.0,
        "tokens": tokens,
        "total_s": phase.total,
        "hook_free_total_s": phase.free,
        "profiler_overhead_s": phase.total - phase.free,
        "seconds_per_step": phase.free / phase.steps if phase.steps else 0.0,
        "tokens_per_s": tokens / phase.free if phase.free > 0 else 0.0,
        "flops": total_cost.flops,
        "bytes": total_cost.bytes,
        "stages": stages,
        "per_layer": per_layer,
        "outside_layers": outside,
        "check": {"stages_plus_other_s": summed, "hook_free_total_s": phase.free,
                  "relative_difference": difference, "tolerance": TOLERANCE, "ok": difference <= TOLERANCE},
    }


def model_facts(model: Transformer) -> dict:
    c = model.config
    return {
        "name": c.name, "architecture": c.architecture, "layers": c.num_layers, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "vocab_size": c.vocab_size, "context_length": c.context_length,
        "parameters": sum({id(p): p.numel() for p in model.parameters()}.values()),
        "dtype": _dtype_name(model.dtype), "device": str(model.device),
    }


def _warm_up(model: Transformer, rows: list[list[int]], prompt_len: int) -> None:
    """A prefill of the real shape and two decode steps, each with and without hooks, discarded.
    The prefill has the measured shape because first calls of a shape can be slow (kernel choice,
    cuDNN attention graphs, allocator growth)."""
    cache = model.new_kv_cache(len(rows), prompt_len + 2)
    stepper = _Stepper(model, cache, rows)
    tokens = torch.tensor([row[:prompt_len] for row in rows], device=model.device)
    nxt = stepper.measure(tokens, 0, 1, 1, hooked_first=True)[3]
    for j in range(2):
        nxt = stepper.measure(nxt, prompt_len + j, 1, 1, hooked_first=j == 1)[3]


@torch.inference_mode()
def profile_model(model: Transformer, tokenizer, *, prompt_len: int = 512, gen_len: int = 128, batch: int = 1,
                  repeats: int = 1, max_repeats: int | None = None, machine: MachineLimits | None = None,
                  warmup: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    """Profile one prefill of `batch` x `prompt_len` tokens and `gen_len` decode steps.

    `tokenizer` only needs `encode(text) -> list[int]`. Each step runs `repeats` times with and
    without hooks, keeping the fastest of each, and up to `max_repeats` times (default 3 x repeats)
    while those two disagree by more than 5% (see `_Stepper.measure`). Returns a
    JSON-ready dict: settings, model facts, machine limits, and per phase ("prefill", "decode") the
    totals, a row per stage (see `stage_row`), per-layer stage times and the sum check.
    """
    config = model.config
    check_run(config, prompt_len, gen_len, batch, repeats)
    max_repeats = 3 * repeats if max_repeats is None else max(_positive_int("max_repeats", max_repeats), repeats)
    note = progress or (lambda _msg: None)
    rows = prompt_rows(tokenizer, prompt_len, batch)
    if warmup:
        note("warm-up")
        _warm_up(model, rows, prompt_len)
    cache = model.new_kv_cache(batch, prompt_len + gen_len)
    stepper = _Stepper(model, cache, rows)
    prefill, decode = _Phase(), _Phase()
    note(f"prefill: {batch} x {prompt_len} tokens")
    hooked, free, stages, tokens, pairs = stepper.measure(torch.tensor(rows, device=model.device), 0, repeats,
                                                          max_repeats, hooked_first=True)
    prefill.add(hooked, free, stages, pairs)
    for j in range(gen_len):
        if j % 16 == 0:
            note(f"decode: step {j + 1} of {gen_len}")
        hooked, free, stages, tokens, pairs = stepper.measure(tokens, prompt_len + j, repeats, max_repeats,
                                                              hooked_first=j % 2 == 1)
        decode.add(hooked, free, stages, pairs)
    dtype = _dtype_name(model.dtype)
    on_kernels = kernel_stage_dtypes(model)
    costs = phase_costs(config, batch, prompt_len, gen_len, model.dtype.itemsize, quantized_weight_bytes(model),
                        head_weight_bytes(model))
    return {
        "settings": {"prompt_len": prompt_len, "gen_len": gen_len, "batch": batch, "repeats": repeats,
                     "max_repeats": max_repeats, "sampling": "greedy"},
        "model": model_facts(model),
        "runtime": {"torch": torch.__version__, "threads": torch.get_num_threads()},
        "machine": machine.to_dict() if machine is not None else None,
        "stages": list(STAGES),
        "phases": {
            "prefill": phase_report(prefill, costs["prefill"], batch * prompt_len, config.num_layers, machine, dtype,
                                    on_kernels),
            "decode": phase_report(decode, costs["decode"], batch * gen_len, config.num_layers, machine, dtype,
                                   on_kernels),
        },
    }


def _fastest_hooked(stepper: _Stepper, tokens: torch.Tensor, pos: int, runs: int):
    """Run one step `runs` times with hooks (a step is idempotent) and keep the fastest: a busy
    machine only ever adds time. Returns (seconds, {stage: seconds, "other" included}, next tokens)."""
    best = None
    for _ in range(runs):
        recorder = StageRecorder(stepper.clock)
        seconds, nxt = stepper.step(tokens, pos, recorder)
        recorder.flush()
        if best is None or seconds < best[0]:
            by_stage = {stage: 0.0 for stage in MEASURED_STAGES}
            for (stage, _layer), s in recorder.seconds.items():
                by_stage[stage] += s
            by_stage["other"] = seconds - sum(by_stage.values())
            best = (seconds, by_stage, nxt)
    return best


def _intensity(costs: dict[str, Cost], stages) -> float:
    return sum((costs[s] for s in stages), Cost()).intensity


def check_sweep(config, prompt_lens, batches, decode_context: int = SWEEP_DECODE_CONTEXT,
                decode_steps: int = SWEEP_DECODE_STEPS) -> None:
    _positive_int("decode_steps", decode_steps)
    _positive_int("decode_context", decode_context)
    for p in prompt_lens:
        _positive_int("a sweep prompt length", p)
        if p > config.context_length:
            raise InvalidRequestError(f"sweep prompt length {p} exceeds the model's context of "
                                      f"{config.context_length} tokens")
    for b in batches:
        _positive_int("a sweep batch size", b)
    if batches and decode_context + 1 > config.context_length:
        raise InvalidRequestError(f"the batch sweep needs {decode_context + 1} tokens of context; "
                                  f"the model has {config.context_length}")


def default_sweep_prompt_lens(config) -> list[int]:
    return [p for p in DEFAULT_SWEEP_PROMPT_LENS if p <= config.context_length]


@torch.inference_mode()
def sweep_model(model: Transformer, tokenizer, *, prompt_lens=DEFAULT_SWEEP_PROMPT_LENS,
                batches=DEFAULT_SWEEP_BATCHES, decode_context: int = SWEEP_DECODE_CONTEXT,
                decode_steps: int = SWEEP_DECODE_STEPS, repeats: int = 1, machine: MachineLimits | None = None,
                progress: Callable[[str], None] | None = None) -> dict:
    """Stage times as the prompt grows (a prefill of batch 1 per length, the fastest of `repeats`)
    and as the batch grows (a decode step with `decode_context` tokens cached, the fastest of
    `decode_steps` runs).

    Only hooked runs are timed (stages + other = the step's time with hooks). The cached keys and
    values of the batch sweep are zeros: attention costs the same whatever they hold.
    """
    config = model.config
    prompt_lens, batches = list(prompt_lens), list(batches)
    check_sweep(config, prompt_lens, batches, decode_context, decode_steps)
    _positive_int("repeats", repeats)
    note = progress or (lambda _msg: None)
    e = model.dtype.itemsize
    rows_all = prompt_rows(tokenizer, max(prompt_lens + [decode_context]), max(batches + [1]))
    _warm_up(model, rows_all[:1], 16)  # the hooks' code path; each point warms up its own shape
    prefill_points = []
    for p in prompt_lens:
        note(f"sweep: prefill of {p} tokens")
        rows = [rows_all[0][:p]]
        stepper = _Stepper(model, model.new_kv_cache(1, p), rows)
        tokens = torch.tensor(rows, device=model.device)
        stepper.step(tokens, 0)  # warm-up for this shape
        seconds, stage_s, _ = _fastest_hooked(stepper, tokens, 0, repeats)
        costs = step_costs(config, 1, p, 0, e, quantized_weight_bytes(model), head_weight_bytes(model))
        prefill_points.append({
            "prompt_len": p, "total_s": seconds, "seconds": stage_s,
            "attention_share": stage_s["attention"] / seconds if seconds > 0 else 0.0,
            "flops": {s: c.flops for s, c in costs.items()},
            "attention_flops_share": costs["attention"].flops / sum(c.flops for c in costs.values()),
        })
    decode_points = []
    for b in batches:
        note(f"sweep: decode step at batch {b}")
        rows = [row[:decode_context] for row in rows_all[:b]]
        stepper = _Stepper(model, model.new_kv_cache(b, decode_context + 1), rows)
        tokens = torch.tensor([[row[-1]] for row in rows], device=model.device)
        stepper.step(tokens, decode_context)  # warm-up for this shape
        step_s, stage_s, _ = _fastest_hooked(stepper, tokens, decode_context, decode_steps)
        costs = step_costs(config, b, 1, decode_context, e, quantized_weight_bytes(model), head_weight_bytes(model))
        decode_points.append({
            "batch": b, "step_s": step_s, "seconds": stage_s, "seconds_per_token": step_s / b,
            "attention_share": stage_s["attention"] / step_s if step_s > 0 else 0.0,
            "flops": {s: c.flops for s, c in costs.items()},
            "projection_intensity": _intensity(costs, PROJECTIONS),
            "step_intensity": _intensity(costs, list(costs)),
        })
    return {
        "prefill": {"batch": 1, "runs": repeats, "points": prefill_points},
        "decode": {"context": decode_context, "runs": decode_steps, "points": decode_points},
        "machine_balance": machine.balance(model.dtype) if machine is not None else None,
    }
