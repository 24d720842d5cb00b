"""Batch-1 decode with one C++ call per decoder layer.

At batch 1 the default model's int4 matmuls take a few milliseconds per token, while the ~15 small
PyTorch ops of each of its 30 blocks (norms, rotary, cache writes, attention, activation, residuals)
cost about as much again in dispatch alone. kernels/cpu/decoder_stack.h's DecoderStack runs every block
-- the same math as model/llama.py's Block, on the packed int4/int8 weights and the contiguous
float32 KV cache -- in one call and one OpenMP region, so a decode step is that call plus the
embedding lookup, the final norm and the output head.

The same call also takes up to MAX_TOKENS tokens at consecutive positions of the sequence (the
target model verifying a speculative draft, a short prompt): every weight tile is read once for all
of them, so a few tokens cost little more than one.

Used automatically by Transformer.forward for 1 to MAX_TOKENS tokens of a single sequence when every
projection of every layer runs on leapllm's packed kernels (a model quantized with `leapllm
quantize`, on a CPU where the kernels build) and the model computes in float32. The layers are built
at the first such step; code that replaces projections afterwards calls
Transformer.reset_fused_decode() (quantize_model does).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from leapllm.kernels import cpu_kernels
from leapllm.kernels.packing import move_to_huge_pages
from leapllm.model.kv_cache import KVCache
from leapllm.model.quantized.layers import packed_linear_of, quantized_linears

# The most tokens one fused call takes (MAX_ROWS in kernels/cpu/common.h: the activation rows
# computed against one read of a weight tile).
MAX_TOKENS = 8


def layer_modules(layer) -> tuple:
    """A block's four projection modules, in the order a step runs them."""
    return layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj


def layer_projections(layer) -> list:
    """The C++ PackedLinear of each of a block's four projections (None where a layer has none)."""
    return [packed_linear_of(m) for m in layer_modules(layer)]


# The stages between the C++ clock marks of a layer are the fused step's phases, named by the
# extension (phase_names, output_head_phase_name) as the profiler names the module stages
# (profiling/stages.py). The phases fold the small steps into their neighbours: the attention norm
# into "qkv_proj", rotary into "attention", the MLP norm and SiLU*up into "gate_up_proj", and (when
# the call computes the logits) the final norm into the output head's.
OUTSIDE_LAYERS = -1  # the layer index of the output head's interval (profiling/stages.py's)


# The family switches (ModelConfig.family_switches) the C++ step computes itself, besides per-head
# q/k norms. Any other switch, including one added later, keeps a model on the PyTorch path.
FUSED_STEP_SWITCHES = ("attention scale", "attn logit softcap", "sliding window")


def fused_step_lacks(c) -> list[str]:
    """What of config c the C++ step does not compute ([]: it runs this model): Llama's block with
    per-head q/k norms, any softmax scale, soft cap and sliding window is what it runs."""
    lacks = [f"{switch}: {what}" for switch, what in c.family_switches().items()
             if switch not in FUSED_STEP_SWITCHES and not (switch == "q/k norm" and c.qk_norm == "head")]
    rope = (c.rope_scaling or {}).get("type")
    if rope in ("longrope", "yarn", "dynamic"):  # scaled cos and sin, or frequencies that follow the length
        lacks.append(f"{rope} rope")
    return lacks


class FusedDecode:
    """The C++ DecoderStack of the model's blocks, built from (and holding references to) its packed weights."""

    def __init__(self, model):
        self._stage_intervals: list | None = None  # see recording_stages
        ext = cpu_kernels()
        config = model.config
        # Every packed weight a step reads, in the order it reads them, on 2 MiB pages (float layers
        # have none to move).
        move_to_huge_pages([getattr(parent, attr) for _, parent, attr in quantized_linears(model)])
        self.projections = [layer_projections(layer) for layer in model.layers]
        layers = []
        for layer, packed in zip(model.layers, self.projections):
            fused = ext.DecoderLayer(*packed, layer.attn_norm.weight, layer.mlp_norm.weight, model.inv_freq,
                                     layer.attn_norm.eps, layer.attn.num_heads, layer.attn.num_kv_heads, config.head_dim)
            attn, params, none = layer.attn, layer.attn.core.params, torch.empty(0)
            fused.set_attention(attn.q_norm.weight if attn.qk_norm else none, attn.k_norm.weight if attn.qk_norm else none,
                                params.softmax_scale(config.head_dim), params.softcap or 0.0, params.window or 0)
            layers.append(fused)
        self.stack = ext.DecoderStack(layers)
        self.num_layers = len(model.layers)
        # The final norm and the output head join the same C++ call when the head is packed too.
        head = packed_linear_of(model.lm_head)
        self.vocab_size = model.config.vocab_size
        self.computes_logits = head is not None and head.bias is None
        if self.computes_logits:
            self.stack.set_output_head(model.norm.weight, model.norm.eps, head)

    @contextmanager
    def recording_stages(self, intervals: list):
        """While inside, every fused step appends (stage, layer, start ns, end ns) of each of its phases
        to `intervals`, from clock marks the C++ code takes (the profiler's stage timing)."""
        self._stage_intervals = intervals
        try:
            yield
        finally:
            self._stage_intervals = None

    @staticmethod
    def supports(model) -> bool:
        if model.device.type != "cpu" or model.dtype != torch.float32 or cpu_kernels() is None:
            return False
        if fused_step_lacks(model.config):
            return False
        if any(layer.mlp.down_proj.in_features % 16 for layer in model.layers):  # gate/up tiles pair up
            return False
        return all(p is not None for layer in model.layers for p in layer_projections(layer))

    def hidden_states(self, x: torch.Tensor, start_pos: int, kv_cache: KVCache) -> torch.Tensor:
        """x (T, hidden) float32 contiguous, T = 1 .. MAX_TOKENS, the embedded tokens at positions
        start_pos .. start_pos + T - 1 (or (hidden,) for one token) -> the last block's output, same
        shape, in place.

        Their keys and values are written into kv_cache; token t attends to positions 0 .. start_pos + t.
        """
        self._run(x, start_pos, kv_cache, None)
        return x

    def logits(self, x: torch.Tensor, start_pos: int, kv_cache: KVCache, last_only: bool) -> torch.Tensor:
        """As hidden_states, then the final norm and the output head in the same call (needs
        computes_logits): x (T, hidden) -> float32 logits (T, vocab), or (1, vocab) of the last token
        with last_only. x is left as the last block's output."""
        tokens = 1 if x.dim() == 1 else x.shape[0]
        logits = torch.empty(1 if last_only else tokens, self.vocab_size, dtype=torch.float32)
        self._run(x, start_pos, kv_cache, logits)
        return logits

    def _run(self, x: torch.Tensor, start_pos: int, kv_cache: KVCache, logits: torch.Tensor | None) -> None:
        tokens = 1 if x.dim() == 1 else x.shape[0]
        if not 1 <= tokens <= MAX_TOKENS:
            raise ValueError(f"a fused step takes 1 to {MAX_TOKENS} tokens, got {tokens}")
        if start_pos + tokens > kv_cache.max_seq_len:
            raise ValueError(f"KV cache holds {kv_cache.max_seq_len} positions, asked to write up to {start_pos + tokens}")
        if self._stage_intervals is None:
            self.stack.forward(x, kv_cache.k, kv_cache.v, start_pos, None, logits)
            return
        ext = cpu_kernels()
        marked_stages = ext.phase_names()
        per_layer = len(marked_stages) + 1
        marks = torch.empty(self.num_layers * per_layer + (logits is not None), dtype=torch.int64)
        self.stack.forward(x, kv_cache.k, kv_cache.v, start_pos, marks, logits)
        m = marks.tolist()
        for i in range(self.num_layers):
            row = m[i * per_layer:(i + 1) * per_layer]
            self._stage_intervals += [(stage, i, row[j], row[j + 1]) for j, stage in enumerate(marked_stages)]
        if logits is not None:  # the final norm runs inside the head's phase, as the layers' norms do
            self._stage_intervals.append((ext.output_head_phase_name(), OUTSIDE_LAYERS, m[-2], m[-1]))
