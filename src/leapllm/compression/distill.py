"""`leapllm distill`: train a smaller (pruned) student to imitate its teacher on a text.

    leapllm prune --method ffn --sparsity 0.5 -o ffn50
    leapllm distill --student ffn50 --text builtin:python-docs -o ffn50-distilled

The loss on each batch of text windows (Hinton et al. 2015, "Distilling the Knowledge in a Neural
Network"):

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))   soft targets, every position
    + (1 - alpha) * cross-entropy(student, next token)                 hard labels, from the text

T^2 keeps the soft term's gradients on the scale of the hard term's whatever the temperature. The
teacher runs without gradients; the student trains in float32 with AdamW, a linear warmup and a
cosine decay of the learning rate.

The text is cut into windows of `seq_len` tokens, visited in a shuffled order that is a function of
the seed and the epoch only, so the data position is the step number. Every `checkpoint_every`
steps the student's weights, the optimizer's moments, the step, the RNG state and the settings go
to a checkpoint folder (safetensors + JSON, no pickles), replaced atomically. `resume=True` carries
on from it; a resumed run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from leapllm.config import DistillSettings
from leapllm.errors import InvalidRequestError
from leapllm.model.llama import Transformer
from leapllm.output_files import write_folder_atomically
from leapllm.tokenization.vocabulary import check_same_vocabulary

CHECKPOINT_STATE = "state.json"


@dataclass
class DistillResult:
    steps: int
    losses: list[float]  # the total loss of every step, resumed steps included
    tokens_seen: int
    seconds: float  # of this run (not of the runs it resumed)
    resumed_from: int  # step the run started at (0 for a fresh run)


# ---------------------------------------------------------------- checks

def training_windows(token_ids, seq_len: int, vocab_size: int) -> torch.Tensor:
    """The text cut into non-overlapping windows (n // seq_len, seq_len)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() < seq_len:
        raise InvalidRequestError(f"the text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise InvalidRequestError(f"token ids must be in [0, {vocab_size}) for this vocabulary")
    rows = ids.numel() // seq_len
    return ids[:rows * seq_len].view(rows, seq_len)


# ---------------------------------------------------------------- the pieces of a step

def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor,
                      temperature: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, soft KL term, hard CE term), each a mean over positions. logits (batch, seq, vocab)."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).reshape(-1, vocab)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).reshape(-1, vocab)
    soft = F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2
    hard = F.cross_entropy(student_logits[:, :-1].reshape(-1, vocab).float(), tokens[:, 1:].reshape(-1))
    return alpha * soft + (1 - alpha) * hard, soft, hard


def learning_rate(step: int, settings: DistillSettings) -> float:
    """Linear warmup to lr over the first warmup steps, then cosine decay to a tenth of it at the last step."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    progress = (step - settings.warmup_steps) / span
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_rows(step: int, windows: int, settings: DistillSettings) -> torch.Tensor:
    """Window indices of `step`'s batch: a shuffled pass over all windows per epoch, the order a
    function of (seed, epoch) alone, so the data position needs no state besides the step."""
    first = step * settings.batch_size
    rows = []
    for sample in range(first, first + settings.batch_size):
        epoch, index = divmod(sample, windows)
        order = torch.randperm(windows, generator=torch.Generator().manual_seed(settings.seed * 100_003 + epoch))
        rows.append(int(order[index]))
    return torch.tensor(rows)


def trainable_parameters(student: Transformer, settings: DistillSettings) -> dict[str, torch.nn.Parameter]:
    """The student's parameters that train, by name; the rest are frozen."""
    frozen = set() if settings.train_embeddings else {"embed_tokens.weight", "lm_head.weight"}
    params = {}
    for name, p in student.named_parameters():  # a tied head appears once, as embed_tokens.weight
        p.requires_grad_(name not in frozen)
        if name not in frozen:
            params[name] = p
    return params


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(folder: Path, student: Transformer, optimizer: torch.optim.Optimizer,
                    params: dict[str, torch.nn.Parameter], step: int, losses: list[float],
                    settings: DistillSettings, text_tokens: int) -> None:
    """Student weights, AdamW moments, step, RNG state and settings, as safetensors + JSON, written
    to a temporary folder and renamed over the previous checkpoint."""
    name_of = {id(p): n for n, p in params.items()}
    moments, steps = {}, {}
    for p, state in optimizer.state.items():
        name = name_of[id(p)]
        moments[f"exp_avg.{name}"] = state["exp_avg"]
        moments[f"exp_avg_sq.{name}"] = state["exp_avg_sq"]
        steps[name] = float(state["step"])
    weights = {n: p.detach() for n, p in student.named_parameters()}
    meta = {"step": step, "losses": losses, "settings": asdict(settings), "text_tokens": text_tokens,
            "samples_seen": step * settings.batch_size, "optimizer_steps": steps,
            "config": {k: v for k, v in asdict(student.config).items() if k not in ("extra", "rope_scaling")}}

    def write_files(staging: Path) -> None:
        save_file({k: v.contiguous().cpu() for k, v in weights.items()}, str(staging / "student.safetensors"))
        save_file({k: v.contiguous().cpu() for k, v in moments.items()}, str(staging / "optimizer.safetensors"))
        save_file({"torch_rng": torch.get_rng_state()}, str(staging / "rng.safetensors"))
        (staging / CHECKPOINT_STATE).write_text(json.dumps(meta), encoding="utf-8")

    write_folder_atomically(folder, write_files)


def load_checkpoint(folder: Path, student: Transformer, optimizer: torch.optim.Optimizer,
                    params: dict[str, torch.nn.Parameter], settings: DistillSettings, text_tokens: int) -> tuple[int, list[float]]:
    """Restore a checkpoint into student and optimizer; returns (step, losses so far)."""
    try:
        meta = json.loads((folder / CHECKPOINT_STATE).read_text(encoding="utf-8"))
        weights = load_file(str(folder / "student.safetensors"))
        moments = load_file(str(folder / "optimizer.safetensors"))
        rng = load_file(str(folder / "rng.safetensors"))["torch_rng"]
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidRequestError(f"cannot resume from {folder}: not a readable checkpoint ({exc})") from None
    if meta["settings"] != asdict(settings):
        changed = sorted(k for k in asdict(settings) if meta["settings"].get(k) != asdict(settings)[k])
        raise InvalidRequestError(f"cannot resume from {folder}: it was written with different settings "
                                  f"({', '.join(changed)}); use the same options or start afresh")
    if meta["text_tokens"] != text_tokens:
        raise InvalidRequestError(f"cannot resume from {folder}: it trained on a text of {meta['text_tokens']} "
                                  f"tokens, this one has {text_tokens}")
    current = dict(student.named_parameters())
    if set(weights) != set(current) or any(weights[n].shape != p.shape for n, p in current.items()):
        raise InvalidRequestError(f"cannot resume from {folder}: its student has a different shape")
    with torch.no_grad():
        for name, p in current.items():
            p.copy_(weights[name])
    # Rebuild AdamW's state exactly as it was (the same tensors it would have kept in memory).
    state = optimizer.state_dict()
    index_of = {n: i for i, n in enumerate(params)}
    state["state"] = {index_of[n]: {"step": torch.tensor(s), "exp_avg": moments[f"exp_avg.{n}"],
                                    "exp_avg_sq": moments[f"exp_avg_sq.{n}"]}
                      for n, s in meta["optimizer_steps"].items()}
    optimizer.load_state_dict(state)
    torch.set_rng_state(rng)
    return meta["step"], meta["losses"]


# ---------------------------------------------------------------- the loop

def distill(teacher: Transformer, student: Transformer, token_ids, settings: DistillSettings | None = None, *,
            checkpoint_dir: str | Path | None = None, checkpoint_every: int = 20, resume: bool = False,
            progress: bool = True) -> DistillResult:
    """Train `student` (in place) to match `teacher` on `token_ids`; see the module docstring.

    Both models must be float Transformers on the same device with the same vocabulary; the
    student trains in float32. resume=True continues from checkpoint_dir (an error if it holds
    no checkpoint or one written with other settings).
    """
    settings = settings or DistillSettings()
    settings.check()
    check_same_vocabulary(teacher, student)
    if student.dtype != torch.float32:
        raise InvalidRequestError(f"the student must be float32 to train, got {student.dtype}")
    if resume and checkpoint_dir is None:
        raise InvalidRequestError("resuming needs a checkpoint folder")
    if checkpoint_every < 1:
        raise InvalidRequestError(f"checkpoint interval must be at least 1 step, got {checkpoint_every}")
    windows = training_windows(token_ids, settings.seq_len, student.config.vocab_size)
    text_tokens = int(torch.as_tensor(token_ids).numel())
    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
    teacher.eval().requires_grad_(False)
    student.train()
    params = trainable_parameters(student, settings)
    optimizer = torch.optim.AdamW(list(params.values()), lr=settings.lr, weight_decay=settings.weight_decay,
                                  betas=(0.9, 0.95))
    start_step, losses = 0, []
    if resume:
        if not (checkpoint / CHECKPOINT_STATE).is_file():
            raise InvalidRequestError(f"cannot resume: {checkpoint} holds no checkpoint")
        start_step, losses = load_checkpoint(checkpoint, student, optimizer, params, settings, text_tokens)
    else:
        torch.manual_seed(settings.seed)
    start = time.perf_counter()
    device = student.device
    bar = tqdm(total=settings.steps, initial=start_step, desc="distilling", unit="step", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        for step in range(start_step, settings.steps):
            tokens = windows[batch_rows(step, windows.shape[0], settings)].to(device)
            with torch.no_grad():
                teacher_logits = teacher(tokens)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, settings)
            loss, soft, hard = distillation_loss(student(tokens), teacher_logits, tokens,
                                                 settings.temperature, settings.alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", kl=f"{float(soft.detach()):.3f}", ce=f"{float(hard.detach()):.3f}")
            done = step + 1
            if checkpoint is not None and (done % checkpoint_every == 0 or done == settings.steps):
                save_checkpoint(checkpoint, student, optimizer, params, done, losses, settings, text_tokens)
    finally:
        bar.close()
        student.eval().requires_grad_(False)
    return DistillResult(steps=settings.steps, losses=losses,
                         tokens_seen=settings.steps * settings.batch_size * settings.seq_len,
                         seconds=time.perf_counter() - start, resumed_from=start_step)


# ---------------------------------------------------------------- students

def student_from_teacher_layers(teacher: Transformer, num_layers: int) -> Transformer:
    """A student with `num_layers` of the teacher's blocks, evenly spread from the first to the last
    (copies), and the teacher's embedding, final norm and head: a shallower start that already
    computes something close to the teacher."""
    from dataclasses import replace

    c = teacher.config
    if not 1 <= num_layers < c.num_layers:
        raise InvalidRequestError(f"a student of {num_layers} layers: choose 1 to {c.num_layers - 1} "
                                  f"(the teacher has {c.num_layers})")
    picked = [round(i * (c.num_layers - 1) / (num_layers - 1)) for i in range(num_layers)] if num_layers > 1 else [0]

    def per_layer(sizes):
        return None if sizes is None else tuple(sizes[i] for i in picked)

    config = replace(c, num_layers=num_layers, layer_num_heads=per_layer(c.layer_num_heads),
                     layer_intermediate_sizes=per_layer(c.layer_intermediate_sizes))
    with torch.device("meta"):
        student = Transformer(config)
    teacher_state = teacher.state_dict()
    state = {name: t.detach().clone() for name, t in teacher_state.items() if not name.startswith("layers.")}
    for new_index, old_index in enumerate(picked):
        prefix = f"layers.{old_index}."
        state |= {f"layers.{new_index}.{name[len(prefix):]}": t.detach().clone()
                  for name, t in teacher_state.items() if name.startswith(prefix)}
    student.load_state_dict(state, assign=True, strict=True)
    if config.tie_word_embeddings:
        student.lm_head.weight = student.embed_tokens.weight
    student.inv_freq = teacher.inv_freq.clone()
    return student
