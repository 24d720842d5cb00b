"""`leapllm prune`: remove weights of a decoder, unstructured or whole heads and channels.

    leapllm prune --method wanda --sparsity 0.5 -o smollm2-wanda50        # zeros, same shapes
    leapllm prune --method 2:4 -o smollm2-2of4                             # 2 of every 4 inputs zero
    leapllm prune --method ffn --sparsity 0.5 -o smollm2-ffn50             # smaller matrices
    leapllm generate "Hello" --model smollm2-ffn50

Methods (all in place on a float `Transformer`, see `prune_model`):

- magnitude: in each output row of every projection inside the blocks (fused Q/K/V, output,
  fused gate/up, down), zero the fraction `sparsity` of weights with the smallest |W|. Per row, as
  Wanda compares, so the two differ only in the score. The embedding and output head stay dense.
- wanda: the same with the score |W_ij| * ||x_j||_2, x_j the j-th input feature of that projection
  over the calibration tokens (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs").
  The activation norms come from one pass of the dense model (not the paper's layer-by-layer
  variant, which feeds each block the already-pruned outputs of the blocks before it).
- 2:4: in every group of 4 consecutive inputs of a row keep the 2 with the largest Wanda score
  (or |W| without calibration data): the pattern NVIDIA's sparse tensor cores run at up to 2x.
  On CUDA a loaded 2:4 folder runs through torch's semi-structured sparse kernels
  (`model.sparse.use_semi_structured_kernels`). These three keep every shape: the saved folder is no smaller
  and a CPU runs it no faster; they show how much of a model can be zero.
- heads: remove query heads. Head h's score is the mean norm of its contribution to the block's
  output, ||W_o[:, h] z_h||_2 over the calibration tokens. Every kv group of a layer keeps the same
  number of query heads (grouped-query attention pairs query head i with kv head i // group size),
  so the KV cache keeps its shape; Q rows and output-projection columns of the removed heads go.
- ffn: remove MLP channels. Channel j's score is ||a_j||_2 * ||W_down[:, j]||_2, a_j = silu(gate_j) * up_j
  over the calibration tokens: how much it can add to the residual stream. Gate/up rows and
  down-projection columns of the removed channels go; layers keep a multiple of `multiple_of`
  channels (128 by default) so that int4 groups of 32, 64 and 128 still divide every input width.

Structured pruning removes units ("one head from every kv group" or "`multiple_of` channels")
either the same number in every layer (`allocation="uniform"`) or by one ranking across all layers
(`allocation="global"`, each layer keeping at least one unit; uniform is the default: on SmolLM2 a
global ranking empties the early layers, whose outputs are smaller, and perplexity explodes), and the removed units' weights are
gone: the folder is smaller and every step does fewer FLOPs. The shapes go into the config
(`ModelConfig.layer_num_heads`, `layer_intermediate_sizes`) when layers differ.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from leapllm.compression.calibration import calibration_rows
from leapllm.config import PRUNING_ALLOCATIONS, PRUNING_METHODS
from leapllm.errors import InvalidRequestError
from leapllm.model.llama import Transformer
from leapllm.model.sparse import PROJECTIONS

UNSTRUCTURED = ("magnitude", "wanda", "2:4")
CALIBRATED = ("wanda", "heads", "ffn")  # these need calibration tokens; 2:4 uses them when given
DEFAULT_ALLOCATION = {"heads": "uniform", "ffn": "uniform"}
DEFAULT_MULTIPLE_OF = 128
CALIBRATION_SEQ_LEN = 512


def check_settings(method: str, sparsity: float | None, allocation: str | None = None,
                   multiple_of: int | None = None) -> float:
    """Raise InvalidRequestError for settings no pruning can run with; returns the sparsity to use."""
    if method not in PRUNING_METHODS:
        raise InvalidRequestError(f"unknown pruning method {method!r}; choose one of {', '.join(PRUNING_METHODS)}")
    if method == "2:4":
        if sparsity not in (None, 0.5):
            raise InvalidRequestError(f"2:4 pruning zeroes exactly half the weights; --sparsity must be 0.5 "
                                      f"or left out, got {sparsity}")
        sparsity = 0.5
    if sparsity is None:
        raise InvalidRequestError(f"--sparsity is required for method {method}")
    if not 0.0 < sparsity < 1.0:
        raise InvalidRequestError(f"--sparsity must be between 0 and 1 (exclusive), got {sparsity}")
    if allocation is not None:
        if method not in ("heads", "ffn"):
            raise InvalidRequestError(f"--allocation applies to heads and ffn pruning, not {method}")
        if allocation not in PRUNING_ALLOCATIONS:
            raise InvalidRequestError(f"unknown allocation {allocation!r}; choose one of {', '.join(PRUNING_ALLOCATIONS)}")
    if multiple_of is not None:
        if method != "ffn":
            raise InvalidRequestError(f"--multiple-of applies to ffn pruning, not {method}")
        if multiple_of < 1:
            raise InvalidRequestError(f"--multiple-of must be at least 1, got {multiple_of}")
    return sparsity


def check_prunable(model: Transformer, method: str, multiple_of: int = DEFAULT_MULTIPLE_OF) -> None:
    if model.config.num_experts:
        raise InvalidRequestError(f"pruning: {model.config.architecture} is a mixture of experts, which the "
                                  "pruning methods do not handle yet")
    for i, layer in enumerate(model.layers):
        for part, attr in PROJECTIONS:
            if not isinstance(getattr(getattr(layer, part), attr), nn.Linear):
                raise InvalidRequestError(f"layers.{i}.{part}.{attr} is quantized; prune a float model "
                                          "(quantize after pruning)")
    if method == "2:4":
        for i, layer in enumerate(model.layers):
            for part, attr in PROJECTIONS:
                inputs = getattr(getattr(layer, part), attr).in_features
                if inputs % 4:
                    raise InvalidRequestError(f"layers.{i}.{part}.{attr} has {inputs} inputs, not a multiple of 4: "
                                              "2:4 pruning needs groups of 4")
    if method == "heads" and all(layer.attn.num_heads == layer.attn.num_kv_heads for layer in model.layers):
        # Removing a query head that has a kv head to itself would change the KV cache's shape.
        raise InvalidRequestError("heads pruning removes query heads that share a kv head; this model has "
                                  "one query head per kv head")
    if method == "heads" and model.config.qk_norm == "full":
        raise InvalidRequestError(f"heads pruning: {model.config.architecture} normalizes q and k over all heads "
                                  "together, so removing a head changes the others")
    if method == "ffn":
        for i, layer in enumerate(model.layers):
            width = layer.mlp.down_proj.in_features
            if width % multiple_of or width // multiple_of < 2:
                raise InvalidRequestError(f"layer {i} has {width} MLP channels: ffn pruning in units of "
                                          f"{multiple_of} channels needs a multiple of {multiple_of}, at least twice it")


# ---------------------------------------------------------------- calibration statistics

class InputStatistics:
    """Forward pre-hooks that sum what pruning scores need over every calibration token:
    per projection the squared norm of each input feature (Wanda), per attention layer each head's
    contribution norm through o_proj, per MLP each channel's squared activation."""

    def __init__(self, model: Transformer, method: str):
        self.sq_norms: dict[str, torch.Tensor] = {}  # "layers.i.attn.qkv_proj" -> (in_features,) sum of x_j^2
        self.head_scores: list[torch.Tensor] = [torch.zeros(layer.attn.num_heads, dtype=torch.float64)
                                                for layer in model.layers]
        self.tokens = 0
        self.handles = []
        for i, layer in enumerate(model.layers):
            for part, attr in PROJECTIONS:
                linear = getattr(getattr(layer, part), attr)
                if method in ("wanda", "2:4") or (method == "ffn" and attr == "down_proj"):
                    self.handles.append(linear.register_forward_pre_hook(self.norm_hook(f"layers.{i}.{part}.{attr}")))
            if method == "heads":
                self.handles.append(layer.attn.o_proj.register_forward_pre_hook(self.head_hook(i, layer.attn)))

    def norm_hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            self.sq_norms[name] = self.sq_norms.get(name, 0) + x.pow(2).sum(0)
        return hook

    def head_hook(self, i: int, attn):
        def hook(module, args):
            z = args[0].detach().reshape(-1, attn.num_heads, attn.head_dim)  # (tokens, heads, head_dim)
            w = module.weight.detach().view(module.out_features, attn.num_heads, attn.head_dim)
            contribution = torch.einsum("thd,ohd->tho", z, w)  # each head's share of the o_proj output
            self.head_scores[i] += contribution.norm(dim=-1).double().sum(0)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.inference_mode()
def collect_statistics(model: Transformer, method: str, calibration_ids, seq_len: int = CALIBRATION_SEQ_LEN,
                       rows_per_forward: int = 2) -> InputStatistics:
    rows = calibration_rows(calibration_ids, seq_len, model.config.vocab_size)
    stats = InputStatistics(model, method)
    try:
        for start in range(0, rows.shape[0], rows_per_forward):
            batch = rows[start:start + rows_per_forward].to(model.device)
            model(batch, last_only=True)  # the hooks see every projection's input; the head is not needed
            stats.tokens += batch.numel()
    finally:
        stats.remove()
    return stats


# ---------------------------------------------------------------- unstructured and 2:4

def prune_rows(weight: torch.Tensor, score: torch.Tensor, sparsity: float) -> None:
    """Zero, in every row of weight, the round(sparsity * in_features) entries with the lowest score."""
    k = round(sparsity * weight.shape[1])
    if k == 0:
        return
    lowest = torch.topk(score, k, dim=1, largest=False).indices
    weight.scatter_(1, lowest, 0.0)


def prune_2_of_4(weight: torch.Tensor, score: torch.Tensor) -> None:
    """Zero in every group of 4 consecutive inputs of a row the 2 entries with the lowest score."""
    out_features, in_features = weight.shape
    groups = score.reshape(out_features, in_features // 4, 4)
    lowest = torch.topk(groups, 2, dim=-1, largest=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, lowest, False)
    weight.mul_(mask.reshape(out_features, in_features).to(weight.dtype))


def weight_scores(weight: torch.Tensor, sq_norm: torch.Tensor | None) -> torch.Tensor:
    """|W|, times ||x_j||_2 per input column when activation statistics are given (Wanda)."""
    score = weight.detach().abs().float()
    if sq_norm is not None:
        score = score * sq_norm.sqrt().float().to(score.device)[None, :]
    return score


@torch.no_grad()
def prune_unstructured(model: Transformer, method: str, sparsity: float, stats: InputStatistics | None) -> None:
    for i, layer in enumerate(model.layers):
        for part, attr in PROJECTIONS:
            name = f"layers.{i}.{part}.{attr}"
            weight = getattr(getattr(layer, part), attr).weight
            score = weight_scores(weight, stats.sq_norms[name] if stats is not None else None)
            if method == "2:4":
                prune_2_of_4(weight, score)
            else:
                prune_rows(weight, score, sparsity)


# ---------------------------------------------------------------- structured: allocation

def removal_counts(unit_costs: list[torch.Tensor], to_remove: int, allocation: str) -> list[int]:
    """How many units each layer loses. unit_costs[l] holds layer l's removable units' costs in
    ascending order (its cheapest first; the last unit of a layer is never removed).
    uniform: round(to_remove / layers) each; global: the to_remove cheapest units of all layers."""
    layers = len(unit_costs)
    if allocation == "uniform":
        per_layer = round(to_remove / layers)
        return [min(per_layer, len(c) - 1) for c in unit_costs]
    candidates = [(float(cost), layer) for layer, costs in enumerate(unit_costs) for cost in costs[:-1]]
    candidates.sort()
    counts = [0] * layers
    for _, layer in candidates[:to_remove]:
        counts[layer] += 1
    return counts


# ---------------------------------------------------------------- structured: heads

@torch.no_grad()
def prune_heads(model: Transformer, sparsity: float, stats: InputStatistics, allocation: str) -> dict:
    """Remove query heads: a unit is one head from each kv group of a layer (the cheapest left in
    each group), so every group keeps as many query heads as the others."""
    unit_costs, per_group = [], []
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        group = attn.num_heads // attn.num_kv_heads
        scores = (stats.head_scores[i] / max(stats.tokens, 1)).view(attn.num_kv_heads, group)
        ascending = scores.sort(dim=1)
        per_group.append((group, ascending.indices))
        unit_costs.append(ascending.values.sum(0))  # cost of the r-th unit: the r-th lowest head of every group
    total_units = sum(g for g, _ in per_group)
    counts = removal_counts(unit_costs, round(sparsity * total_units), allocation)
    for layer, (group, order), removed in zip(model.layers, per_group, counts):
        kept = []
        for kv in range(layer.attn.num_kv_heads):
            kept += sorted(kv * group + int(h) for h in order[kv, removed:])  # the group's heads stay together
        shrink_attention(layer.attn, kept)
    heads = tuple(layer.attn.num_heads for layer in model.layers)
    model.config = uniform_if_possible(replace(model.config, num_heads=max(heads), layer_num_heads=heads))
    model.config.validate()
    return {"kept_heads": list(heads)}


def shrink_attention(attn, kept_heads: list[int]) -> None:
    """Keep only the query heads `kept_heads` (ascending, equally many per kv group): their Q rows of
    the fused projection and their columns of o_proj."""
    d = attn.head_dim
    q_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kept_heads])
    kv_rows = torch.arange(attn.q_size, attn.q_size + 2 * attn.kv_size)
    rows = torch.cat([q_rows, kv_rows]).to(attn.qkv_proj.weight.device)
    attn.qkv_proj = sliced_linear(attn.qkv_proj, rows=rows)
    attn.o_proj = sliced_linear(attn.o_proj, columns=q_rows.to(attn.o_proj.weight.device))
    attn.num_heads = len(kept_heads)
    attn.q_size = attn.num_heads * d
    attn.core.grouped = attn.num_heads != attn.num_kv_heads


def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding only the given output rows and/or input columns of `linear`."""
    weight, bias = linear.weight.detach(), linear.bias
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias.detach()[rows]
    if columns is not None:
        weight = weight[:, columns]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    out.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().contiguous(), requires_grad=linear.weight.requires_grad)
    return out


# ---------------------------------------------------------------- structured: ffn channels

def channel_scores(model: Transformer, stats: InputStatistics) -> list[torch.Tensor]:
    """Per layer (channels,): ||a_j||_2 over the calibration tokens times ||W_down[:, j]||_2."""
    scores = []
    for i, layer in enumerate(model.layers):
        activation_norm = stats.sq_norms[f"layers.{i}.mlp.down_proj"].sqrt().float()
        column_norm = layer.mlp.down_proj.weight.detach().float().norm(dim=0).cpu()
        scores.append(activation_norm.cpu() * column_norm)
    return scores


@torch.no_grad()
def prune_ffn(model: Transformer, sparsity: float, stats: InputStatistics, allocation: str, multiple_of: int) -> dict:
    """Remove MLP channels in units of `multiple_of` (the lowest-scored ones of a layer first)."""
    scores = channel_scores(model, stats)
    orders = [s.argsort() for s in scores]  # ascending
    unit_costs = [s[order].view(-1, multiple_of).sum(1) for s, order in zip(scores, orders)]
    total_units = sum(len(u) for u in unit_costs)
    counts = removal_counts(unit_costs, round(sparsity * total_units), allocation)
    for layer, order, removed in zip(model.layers, orders, counts):
        kept = order[removed * multiple_of:].sort().values
        shrink_mlp(layer.mlp, kept)
    sizes = tuple(layer.mlp.down_proj.in_features for layer in model.layers)
    model.config = uniform_if_possible(replace(model.config, intermediate_size=max(sizes),
                                               layer_intermediate_sizes=sizes))
    model.config.validate()
    return {"kept_channels": list(sizes)}


def shrink_mlp(mlp, kept_channels: torch.Tensor) -> None:
    """Keep only the channels `kept_channels`: their gate and up rows and their down_proj columns."""
    width = mlp.down_proj.in_features
    kept = kept_channels.to(mlp.down_proj.weight.device)
    mlp.gate_up_proj = sliced_linear(mlp.gate_up_proj, rows=torch.cat([kept, kept + width]))
    mlp.down_proj = sliced_linear(mlp.down_proj, columns=kept)


def uniform_if_possible(config):
    """Drop per-layer sizes that are the same in every layer (then the config reads like any other)."""
    if config.layer_num_heads is not None and len(set(config.layer_num_heads)) == 1:
        config = replace(config, num_heads=config.layer_num_heads[0], layer_num_heads=None)
    if config.layer_intermediate_sizes is not None and len(set(config.layer_intermediate_sizes)) == 1:
        config = replace(config, intermediate_size=config.layer_intermediate_sizes[0], layer_intermediate_sizes=None)
    return config


# ---------------------------------------------------------------- the API

def zero_fraction(model: Transformer) -> float:
    """Fraction of zero weights in the blocks' projections."""
    zeros = total = 0
    for layer in model.layers:
        for part, attr in PROJECTIONS:
            w = getattr(getattr(layer, part), attr).weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total


def block_parameters(model: Transformer) -> int:
    return sum(p.numel() for layer in model.layers for p in layer.parameters())


def prune_model(model: Transformer, method: str, sparsity: float | None = None, calibration_ids=None, *,
                allocation: str | None = None, multiple_of: int | None = None,
                calibration_seq_len: int = CALIBRATION_SEQ_LEN) -> dict:
    """Prune `model` in place (see the module docstring); returns what was done: the method, its
    settings and the result (sparsity reached, parameters before and after, kept heads or channels).

    calibration_ids: token ids of calibration text; required by wanda, heads and ffn, optional for
    2:4 (Wanda scores with it, magnitude without), ignored by magnitude.
    """
    sparsity = check_settings(method, sparsity, allocation, multiple_of)
    if method in ("heads", "ffn"):
        allocation = allocation or DEFAULT_ALLOCATION[method]
    multiple_of = multiple_of or DEFAULT_MULTIPLE_OF
    check_prunable(model, method, multiple_of)
    if method in CALIBRATED and calibration_ids is None:
        raise InvalidRequestError(f"{method} pruning needs calibration text")
    stats = None
    if method in CALIBRATED or (method == "2:4" and calibration_ids is not None):
        stats = collect_statistics(model, method, calibration_ids, calibration_seq_len)
    before = block_parameters(model)
    report: dict = {"method": method, "sparsity": sparsity}
    if method in UNSTRUCTURED:
        report["score"] = "magnitude" if stats is None else "wanda"
        prune_unstructured(model, method, sparsity, stats)
        report["zero_fraction"] = zero_fraction(model)
    elif method == "heads":
        report["allocation"] = allocation
        report |= prune_heads(model, sparsity, stats, allocation)
    else:
        report |= {"allocation": allocation, "multiple_of": multiple_of}
        report |= prune_ffn(model, sparsity, stats, allocation, multiple_of)
    if stats is not None:
        report["calibration_tokens"] = stats.tokens
    report["block_parameters_before"], report["block_parameters_after"] = before, block_parameters(model)
    return report
