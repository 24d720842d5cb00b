"""Activation-aware int4 quantization (AWQ-style), calibrated on a text.

Round-to-nearest treats every input channel alike, but a few channels carry much larger
activations, and their weights' rounding errors dominate a layer's output error. AWQ (Lin et al.,
2023) scales those weight columns up before quantizing (so they get finer steps relative to their
size) and divides the activations by the same factor, folded into the operation that produces them,
so the float model is unchanged:

    y = W x = (W diag(s)) (x / s)       s = mean|x|^alpha per input channel, alpha searched in [0, 1]

alpha = 0 is plain round-to-nearest, so the search never does worse than RTN on the samples.
Where 1 / s is folded:
    fused Q/K/V   <- the attention norm's weight      fused gate/up <- the MLP norm's weight
    down          <- the `up` half of gate/up         output head   <- the final norm's weight
The attention output projection is not scaled: with grouped-query attention its inputs come from
value heads shared by several query heads, so no single fold point exists (AutoAWQ skips it too).

Then each group's quantization range is searched: shrinking [min, max] clips a few outliers but
rounds every other weight more finely; the ratio with the lowest output error on the calibration
activations wins, per row and group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leapllm.compression.calibration import calibration_rows
from leapllm.errors import InvalidRequestError

ALPHAS = tuple(i / 8 for i in range(9))  # 0 = round to nearest
CLIP_RATIOS = tuple(1 - i / 40 for i in range(9))  # 1.0 down to 0.8


@dataclass
class ActivationStats:
    """What the search needs of one Linear's inputs on the calibration text."""
    mean_abs: torch.Tensor  # (in_features,) mean |x| over every calibration token
    sample: torch.Tensor  # (rows, in_features) a random subset of the input rows, for output errors


def collect_activation_stats(model, linears: dict[str, nn.Linear], token_ids: torch.Tensor, seq_len: int = 512,
                             sample_rows: int = 256, seed: int = 0) -> dict[str, ActivationStats]:
    """Run the calibration tokens through the float model, recording each listed Linear's inputs."""
    if len(token_ids) < seq_len:
        raise InvalidRequestError(f"the calibration text has {len(token_ids)} tokens; it needs at least {seq_len}")
    windows = calibration_rows(token_ids, seq_len, model.config.vocab_size)  # (windows, seq_len)
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(windows.numel(), generator=gen)[:sample_rows].sort().values  # rows to sample
    sums = {name: torch.zeros(lin.in_features) for name, lin in linears.items()}
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    offset = 0

    def recorder(name):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, module.in_features).cpu()  # (seq_len, in)
            sums[name] += x.abs().sum(0)
            local = keep[(keep >= offset) & (keep < offset + x.shape[0])] - offset
            rows[name].append(x[local])
        return hook

    handles = [lin.register_forward_pre_hook(recorder(name)) for name, lin in linears.items()]
    try:
        with torch.inference_mode():
            for window in windows:
                model(window[None].to(model.device))
                offset += seq_len
    finally:
        for h in handles:
            h.remove()
    return {name: ActivationStats(sums[name] / windows.numel(), torch.cat(rows[name])) for name in linears}


def fake_quantize(weight: torch.Tensor, group_size: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """quantize_int4_groupwise then dequantize, in float (no packing): what the searches evaluate."""
    n, k = weight.shape
    w = weight.reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    if clip is not None:
        lo, hi = lo * clip[..., None], hi * clip[..., None]
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((w - lo) / scale).round_().clamp_(0, 15)
    return (q.mul_(scale).add_(lo)).reshape(n, k)


def search_scale(weight: torch.Tensor, stats: ActivationStats, group_size: int) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale s (in,) and its alpha minimizing ||Q(W s)(x / s) - W x||^2 on the sample."""
    w = weight.detach().float()
    x = stats.sample
    reference = x @ w.T  # (rows, out)
    best = (float("inf"), torch.ones(w.shape[1]), 0.0)
    for alpha in ALPHAS:
        s = stats.mean_abs.clamp(min=1e-5).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1
        error = ((x / s) @ fake_quantize(w * s, group_size).T - reference).pow(2).sum().item()
        if error < best[0]:
            best = (error, s, alpha)
    return best[1], best[2]


def search_clip(weight: torch.Tensor, sample: torch.Tensor, group_size: int, chunk: int = 8192) -> torch.Tensor:
    """Per (row, group) shrink ratio of the [min, max] range with the lowest output error on the sample."""
    w = weight.detach().float()
    n, k = w.shape
    groups = k // group_size
    xg = sample.reshape(-1, groups, group_size).transpose(0, 1)  # (groups, rows, group)
    # A group's output error over the sample rows is d^T (X_g^T X_g) d for its weight error d: one
    # (group x group) Gram matrix per group replaces a pass over every sample row.
    gram = xg.transpose(1, 2) @ xg  # (groups, group, group)
    best_ratio = torch.ones(n, groups)
    for start in range(0, n, chunk):
        wc = w[start:start + chunk]
        best_error = torch.full((wc.shape[0], groups), float("inf"))
        for ratio in CLIP_RATIOS:
            clip = torch.full((wc.shape[0], groups), ratio)
            diff = (wc - fake_quantize(wc, group_size, clip)).reshape(wc.shape[0], groups, group_size)
            error = torch.einsum("ngk,gkl,ngl->ng", diff, gram, diff)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_ratio[start:start + chunk][better] = ratio
    return best_ratio


def awq_groups(model) -> list[tuple[str, nn.Linear, callable]]:
    """(name, linear, fold) in the order scales are applied: fold(s) divides the producer of the input by s."""
    if model.config.num_experts:
        raise InvalidRequestError(f"AWQ: {model.config.architecture} is a mixture of experts, which AWQ's "
                                  "scale search does not handle yet")
    if model.config.norm_placement == "post":
        raise InvalidRequestError(f"AWQ folds its scales into the norm before each projection; "
                                  f"{model.config.architecture} has its norms after attention and the MLP")
    out = []
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.attn, layer.mlp

        def fold_norm(norm):
            return lambda s: norm.weight.data.div_(s.to(norm.weight.dtype))

        def fold_up(gate_up):
            def fold(s):
                half = gate_up.out_features // 2  # rows [gate | up]: x_down = silu(gate) * up is linear in up
                gate_up.weight.data[half:] /= s[:, None].to(gate_up.weight.dtype)
            return fold

        out += [(f"layers.{i}.mlp.down_proj", mlp.down_proj, fold_up(mlp.gate_up_proj)),
                (f"layers.{i}.mlp.gate_up_proj", mlp.gate_up_proj, fold_norm(layer.mlp_norm)),
                (f"layers.{i}.attn.qkv_proj", attn.qkv_proj, fold_norm(layer.attn_norm)),
                (f"layers.{i}.attn.o_proj", attn.o_proj, None)]
    return out + [("lm_head", model.lm_head, lambda s: model.norm.weight.data.div_(s.to(model.norm.weight.dtype)))]


def apply_awq(model, token_ids: torch.Tensor, group_size: int, seq_len: int = 512
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Scale the float model's weights in place (output unchanged up to float rounding). Returns the
    clip ratio per Linear (name -> (out, in / group)) to quantize it with, and the factor each
    rescaled Linear's input columns were multiplied by (name -> (in,)): a tied head's table is its
    rows divided by them."""
    if model.config.tie_word_embeddings:
        # The head gets its own copy: scaling it must not change the embedding table.
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    groups = awq_groups(model)
    stats = collect_activation_stats(model, {name: lin for name, lin, _ in groups}, token_ids, seq_len)
    clips, scales = {}, {}
    for name, linear, fold in groups:
        st = stats[name]
        if fold is not None:
            s, _ = search_scale(linear.weight, st, group_size)
            linear.weight.data.mul_(s[None, :].to(linear.weight.dtype))
            fold(s)
            scales[name] = s
            st = ActivationStats(st.mean_abs / s, st.sample / s)
        clips[name] = search_clip(linear.weight, st.sample, group_size)
    return clips, scales
