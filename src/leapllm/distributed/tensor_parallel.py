"""Splitting a loaded Transformer in place into the shard of one tensor-parallel rank.

Megatron-style, per block:

- attention: each rank owns a contiguous range of query heads and the key/value heads they
  read. `qkv_proj` is column-parallel (it keeps the q, k and v rows of those heads), `o_proj`
  row-parallel (it keeps the matching input columns): each rank's `o_proj` yields a partial sum
  of the output, and one all-reduce adds them up.
- MLP: `gate_up_proj` keeps a slice of the gate rows and the same slice of the up rows, so
  silu(gate) * up still pairs the right columns; `down_proj` keeps the matching input columns
  and ends with the block's second all-reduce.
- output head: vocabulary-parallel. Each rank computes the logits of its slice of the vocabulary
  and rank 0 gathers them; only rank 0 samples, so the other ranks never need the full row.

The embedding, the norms and rotary are replicated: they are small, and splitting the embedding
would cost a third all-reduce per step.

Heads that do not divide. Query heads are split as evenly as possible (SmolLM2-135M's 9 heads
over 2 ranks: 5 and 4), and a rank holds a copy of every kv head its query heads read. When a
rank's query heads cover its kv heads unevenly (heads 0-4 read kv heads 0,0,0,1,1), the kv head
is duplicated so that each local kv head serves the same number of query heads (here one: the
rank's cache holds 5 kv heads instead of 2). This costs KV-cache memory and some qkv rows on
that rank, never correctness: every query head still attends with exactly its own key/value
weights. When the kv heads divide by the number of ranks, nothing is duplicated and the layout
is the usual one.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leapllm.errors import InvalidRequestError
from leapllm.model.llama import MLP, Attention, Transformer


def split_evenly(n: int, parts: int, index: int) -> range:
    """The index-th of `parts` contiguous ranges covering 0..n-1, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


@dataclass(frozen=True)
class HeadShard:
    """The attention heads of one rank: global query heads, and the global kv head of each local kv slot."""
    q_heads: range
    kv_heads: list[int]


def shard_heads(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> HeadShard:
    q_heads = split_evenly(num_heads, world_size, rank)
    per_group = num_heads // num_kv_heads
    kv_of_q = [h // per_group for h in q_heads]  # the kv head each local query head reads
    # Consecutive query heads share a kv head in runs; one local kv slot serves `per_slot` query
    # heads, the largest count that divides every run (so grouped attention's q -> kv mapping,
    # local query head j reads local kv slot j // per_slot, stays exact).
    runs = [len(list(run)) for _, run in itertools.groupby(kv_of_q)]
    per_slot = math.gcd(*runs)
    return HeadShard(q_heads, kv_of_q[::per_slot])


def check_tensor_parallel(model: Transformer, world_size: int) -> None:
    """Raise InvalidRequestError if the model cannot be split over world_size ranks."""
    if world_size < 1:
        raise InvalidRequestError(f"tensor parallelism needs at least 1 rank, got {world_size}")
    if model.config.num_experts and world_size > 1:
        raise InvalidRequestError(f"tensor parallelism: {model.config.architecture} is a mixture of experts; "
                                  "splitting experts over ranks is not supported")
    if model.config.qk_norm == "full" and world_size > 1:
        # Its q/k norms average over every head: a rank holding some heads would need an all-reduce.
        raise InvalidRequestError(f"tensor parallelism: {model.config.architecture} normalizes q and k over all "
                                  "heads together, which a rank holding some of them cannot do")
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.attn, layer.mlp
        if world_size > attn.num_heads:
            raise InvalidRequestError(
                f"cannot split {attn.num_heads} attention heads over {world_size} ranks: every rank needs at least "
                f"one head, so this model takes at most {attn.num_heads} ranks")
        for name, module in (("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj),
                             ("gate_up_proj", mlp.gate_up_proj), ("down_proj", mlp.down_proj)):
            if type(module) is not nn.Linear:
                raise InvalidRequestError(
                    f"tensor parallelism splits float nn.Linear weights; layer {i}'s {name} is a "
                    f"{type(module).__name__} (load the unquantized model instead)")
    if type(model.lm_head) is not nn.Linear:
        raise InvalidRequestError(
            f"tensor parallelism splits a float output head, not a {type(model.lm_head).__name__}")
    for rank in range(world_size):
        kv = {len(shard_heads(layer.attn.num_heads, layer.attn.num_kv_heads, rank, world_size).kv_heads)
              for layer in model.layers}
        if len(kv) > 1:
            raise InvalidRequestError(
                f"rank {rank} of {world_size} would hold different numbers of kv heads in different layers "
                f"({sorted(kv)}); the KV cache needs one count for every layer")


def local_kv_heads(model: Transformer) -> int:
    """kv heads per layer in this shard's KV cache (the same in every layer, check_tensor_parallel makes sure)."""
    return model.layers[0].attn.num_kv_heads


def new_linear(weight: torch.Tensor, bias: torch.Tensor | None, cls=nn.Linear, **kwargs) -> nn.Linear:
    layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", **kwargs)
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return layer


class RowParallelLinear(nn.Linear):
    """A linear layer holding some input columns: its output is a partial sum that an all-reduce completes."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, comm=None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        self.comm.all_reduce(y)
        return y


class VocabParallelHead(nn.Linear):
    """The output head of a slice of the vocabulary; rank 0 gathers every slice into full logits.

    Slices are padded to the same length (gather needs equal sizes); the padding rows are zero and
    cut off after the gather. Ranks other than 0 return their own slice, which nobody reads.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, comm=None,
                 vocab_size: int = 0):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.comm, self.vocab_size = comm, vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight, self.bias).contiguous()
        slices = self.comm.gather(local)
        if slices is None:  # not rank 0
            return local
        return torch.cat(slices, dim=-1)[..., :self.vocab_size]


def shard_attention(attn: Attention, rank: int, world_size: int, comm) -> None:
    heads = shard_heads(attn.num_heads, attn.num_kv_heads, rank, world_size)
    hd, q_size, kv_size = attn.head_dim, attn.q_size, attn.kv_size
    device = attn.qkv_proj.weight.device

    def rows(offset: int, head_list) -> torch.Tensor:
        return torch.cat([torch.arange(offset + h * hd, offset + (h + 1) * hd, device=device) for h in head_list])

    q_rows = rows(0, heads.q_heads)
    qkv_rows = torch.cat([q_rows, rows(q_size, heads.kv_heads), rows(q_size + kv_size, heads.kv_heads)])
    qkv = attn.qkv_proj
    attn.qkv_proj = new_linear(qkv.weight[qkv_rows], None if qkv.bias is None else qkv.bias[qkv_rows])
    o = attn.o_proj
    # The output bias (if any) is added once, by rank 0, not once per rank.
    attn.o_proj = new_linear(o.weight[:, q_rows], o.bias if o.bias is not None and rank == 0 else None,
                             RowParallelLinear, comm=comm)
    attn.num_heads, attn.num_kv_heads = len(heads.q_heads), len(heads.kv_heads)
    attn.q_size, attn.kv_size = attn.num_heads * hd, attn.num_kv_heads * hd
    attn.core.grouped = attn.num_heads != attn.num_kv_heads


def shard_mlp(mlp: MLP, rank: int, world_size: int, comm) -> None:
    gate_up, down = mlp.gate_up_proj, mlp.down_proj
    intermediate = gate_up.weight.shape[0] // 2  # rows are [gate | up]
    cols = split_evenly(intermediate, world_size, rank)
    rows = torch.cat([torch.arange(cols.start, cols.stop), torch.arange(intermediate + cols.start,
                                                                        intermediate + cols.stop)])
    mlp.gate_up_proj = new_linear(gate_up.weight[rows.to(gate_up.weight.device)], None)
    mlp.down_proj = new_linear(down.weight[:, cols.start:cols.stop],
                               down.bias if down.bias is not None and rank == 0 else None,
                               RowParallelLinear, comm=comm)


def shard_head(model: Transformer, rank: int, world_size: int, comm) -> None:
    head = model.lm_head
    vocab = head.weight.shape[0]
    per_rank = -(-vocab // world_size)
    start, stop = min(rank * per_rank, vocab), min((rank + 1) * per_rank, vocab)
    weight = head.weight.new_zeros(per_rank, head.weight.shape[1])
    weight[:stop - start] = head.weight[start:stop]
    bias = None
    if head.bias is not None:
        bias = head.bias.new_zeros(per_rank)
        bias[:stop - start] = head.bias[start:stop]
    # A new weight: with tied embeddings the (replicated) embedding keeps the full matrix.
    model.lm_head = new_linear(weight, bias, VocabParallelHead, comm=comm, vocab_size=vocab)


def shard_model(model: Transformer, rank: int, world_size: int, comm) -> Transformer:
    """Turn `model` (the full model, loaded) into rank `rank`'s shard of `world_size`, in place.

    `comm` (a communicator.Communicator, or anything with its all_reduce and gather) runs the
    collectives; it only has to be connected by the time the shard runs a forward pass.
    """
    check_tensor_parallel(model, world_size)
    for layer in model.layers:
        shard_attention(layer.attn, rank, world_size, comm)
        shard_mlp(layer.mlp, rank, world_size, comm)
    shard_head(model, rank, world_size, comm)
    return model
