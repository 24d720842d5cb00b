"""Stages of the forward pass, and module hooks that time them.

The model has one small module per stage (see `leapllm.model.llama`), so timing a stage is two
module hooks: a forward pre-hook marks the clock when the module starts and a forward hook marks it
when it returns. `StageHooks` registers them on every stage module of a model and removes them on
exit; nothing in the model changes and nothing global is touched.

Clocks: on CPU every PyTorch op has finished when it returns, so `time.perf_counter_ns()` in the
hooks is exact. On CUDA ops are queued, so the hooks record `torch.cuda.Event`s on the stream and
the elapsed times are read after one synchronize at the end of the step. Both clocks have the same
three methods, so the profiler has one code path.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from contextlib import ExitStack

import torch
from torch import nn

from leapllm.model.fused_decode import OUTSIDE_LAYERS
from leapllm.model.llama import AttentionCore, RMSNorm, RotaryEmbedding, SiluAndMul
from leapllm.model.quantized.embedding import BlockQuantizedEmbedding, PackedRowsEmbedding
from leapllm.model.quantized.layers import QUANTIZED_LAYERS, packed_linear_of

LINEAR_TYPES = (nn.Linear, *QUANTIZED_LAYERS)

# In the order they run. "other" is everything the stages do not cover: Python, tensor glue
# (reshapes, residual adds, building the next step's input), and in a profiled run the hooks' own cost.
STAGES = ("embedding", "norm", "qkv_proj", "rotary", "attention", "o_proj", "gate_up_proj", "activation",
          "down_proj", "lm_head", "sampling", "other")
MEASURED_STAGES = STAGES[:-1]
# The stages found inside each transformer block.
LAYER_STAGES = ("norm", "qkv_proj", "rotary", "attention", "o_proj", "gate_up_proj", "activation", "down_proj")

STAGE_LABELS = {
    "embedding": "embedding lookup",
    "norm": "RMS norms",
    "qkv_proj": "Q/K/V projection",
    "rotary": "rotary",
    "attention": "attention core",
    "o_proj": "output projection",
    "gate_up_proj": "MLP gate/up",
    "activation": "activation (SiLU*up)",
    "down_proj": "MLP down",
    "lm_head": "output head",
    "sampling": "sampling",
    "other": "other (Python, glue)",
}

# OUTSIDE_LAYERS (-1): the layer index of stages that are not in a block (embedding, final norm, head, sampling)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def stage_of(name: str, module: nn.Module) -> str | None:
    """The stage a module implements, from its type or attribute name; None for containers."""
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, RMSNorm):
        return "norm"
    if isinstance(module, RotaryEmbedding):
        return "rotary"
    if isinstance(module, AttentionCore):
        return "attention"
    if isinstance(module, SiluAndMul):
        return "activation"
    if isinstance(module, (nn.Embedding, PackedRowsEmbedding, BlockQuantizedEmbedding)) and leaf == "embed_tokens":
        return "embedding"
    if isinstance(module, LINEAR_TYPES) and leaf in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"):
        return leaf
    return None


def quantized_weight_bytes(model: nn.Module) -> float | None:
    """Bytes per projection weight (scales included) of a `leapllm quantize` model; None for float ones."""
    layer = model.layers[0].attn.qkv_proj  # (every block has one; a mixture of experts has no single MLP)
    return layer.bytes_per_weight if isinstance(layer, QUANTIZED_LAYERS) else None


def head_weight_bytes(model: nn.Module) -> float | None:
    """Bytes per output-head weight of a quantized head (which `--head` may quantize otherwise than the
    projections); None for a float one."""
    head = model.lm_head
    return head.bytes_per_weight if isinstance(head, QUANTIZED_LAYERS) else None


def kernel_stage_dtypes(model: nn.Module) -> dict[str, str]:
    """"int8" for each projection stage that runs on leapllm's int8-activation tiles (its roofline
    ceiling is the machine's int8 rate, not the model dtype's matmul rate)."""
    stages = {}
    for stage, _layer, module in stage_modules(model):
        if stage in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head") and packed_linear_of(module):
            stages[stage] = "int8"
    return stages


def layer_of(name: str) -> int:
    """The block index in a module name like `layers.12.attn.core`, or OUTSIDE_LAYERS."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else OUTSIDE_LAYERS


def stage_modules(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """(stage, layer, module) for every stage module of the model, in definition order. A module held
    twice is found under each name: a tied head's packed table is also the embedding's `table`."""
    found = []
    for name, module in model.named_modules(remove_duplicate=False):
        stage = stage_of(name, module)
        if stage is not None:
            found.append((stage, layer_of(name), module))
    return found


class CpuClock:
    """Wall clock for CPU work: every op has finished when it returns."""

    def __init__(self, device: torch.device | None = None):
        self.mark = time.perf_counter_ns

    def begin(self) -> None:
        """Called at the start of every step (the CUDA clock recycles its events there)."""

    @staticmethod
    def seconds(start, end) -> float:
        return (end - start) * 1e-9

    def synchronize(self) -> None:
        pass


class CudaClock:
    """CUDA events recorded on the current stream; read them only after `synchronize()`.

    Events come from a pool that `begin()` recycles at the start of each step (everything marked
    in the previous step has been read by then), so a hook costs one `record` call and no event
    is created or destroyed while a step is timed.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.pool: list[torch.cuda.Event] = []
        self.used = 0
        self.stream = None

    def begin(self) -> None:
        self.used = 0
        self.stream = torch.cuda.current_stream(self.device)

    def mark(self):
        if self.used == len(self.pool):
            self.pool.append(torch.cuda.Event(enable_timing=True))
        event = self.pool[self.used]
        self.used += 1
        event.record(self.stream)
        return event

    @staticmethod
    def seconds(start, end) -> float:
        return start.elapsed_time(end) * 1e-3  # elapsed_time is in milliseconds

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def clock_for(device: torch.device | str):
    device = torch.device(device)
    return CudaClock(device) if device.type == "cuda" else CpuClock(device)


class StageRecorder:
    """Collects (stage, layer, start mark, end mark) intervals; `flush()` turns them into seconds.

    Marks stay unread until the flush, so a CUDA step is not synchronized in the middle.
    """

    def __init__(self, clock):
        self.clock = clock
        self.pending: list[tuple[str, int, object, object]] = []
        self.seconds: dict[tuple[str, int], float] = defaultdict(float)  # (stage, layer) -> seconds

    def add(self, stage: str, layer: int, start, end) -> None:
        self.pending.append((stage, layer, start, end))

    def flush(self) -> dict[tuple[str, int], float]:
        """Synchronize, add the pending intervals to `seconds`, and return this flush's own times."""
        self.clock.synchronize()
        step: dict[tuple[str, int], float] = defaultdict(float)
        for stage, layer, start, end in self.pending:
            step[stage, layer] += self.clock.seconds(start, end)
        self.pending.clear()
        for key, value in step.items():
            self.seconds[key] += value
        return dict(step)


class StageHooks:
    """Context manager: time every stage module of `model` into `recorder` while inside.

    >>> with StageHooks(model, recorder):
    ...     model(tokens)
    """

    def __init__(self, model: nn.Module, recorder: StageRecorder):
        self.model = model
        self.recorder = recorder
        self.handles: list = []

    def __enter__(self) -> StageHooks:
        mark, pending = self.recorder.clock.mark, self.recorder.pending
        for stage, layer, module in stage_modules(self.model):
            starts: list = []  # a stack, in case a module is ever called re-entrantly

            def pre(_module, _args, starts=starts):
                starts.append(mark())

            def post(_module, _args, _out, starts=starts, stage=stage, layer=layer):
                pending.append((stage, layer, starts.pop(), mark()))

            self.handles.append(module.register_forward_pre_hook(pre))
            self.handles.append(module.register_forward_hook(post))
        # A fused batch-1 decode step (model/fused_decode.py) runs each block in one C++ call, so its
        # stages come from clock marks the C++ code takes (CPU only, the same monotonic clock).
        self.fused_recording = ExitStack()
        fused = getattr(self.model, "fused_decode", None)  # a tensor-parallel model has none
        if fused is not None:
            self.fused_recording.enter_context(fused.recording_stages(pending))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.fused_recording.close()
