"""`leapllm distill`: train a pruned or shallower student on a teacher's outputs; saved as a folder.

    leapllm prune --method ffn --sparsity 0.5 -o ffn50
    leapllm distill --student ffn50 -o ffn50-distilled                       # teacher: the default model
    leapllm distill --student config:layers=20 --text notes.txt --steps 200 -o smollm2-20-layers

Interrupted runs (Ctrl-C, a killed job) continue with the same command plus --resume, from the
last checkpoint in OUT.checkpoints (removed once OUT is written).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from leapllm.cli.args import threads_from_args
from leapllm.config import DistillSettings

DEFAULTS = DistillSettings()
STUDENT_CONFIG_PREFIX = "config:"


def add_distill_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("distill", help="knowledge distillation of a smaller student from a teacher",
                              description="Train the student on the text with alpha * T^2 * KL(teacher || student) "
                                          "on temperature-softened logits + (1 - alpha) * cross-entropy on the next "
                                          "tokens. Checkpoints every --checkpoint-every steps; --resume continues.")
    p.add_argument("--teacher", metavar="PATH", help="teacher model (default: the default model)")
    p.add_argument("--student", required=True, metavar="PATH|config:layers=N",
                   help="a pruned model folder (or any model path with the teacher's vocabulary), or "
                        "config:layers=N for N of the teacher's blocks, evenly spread")
    p.add_argument("--text", default="builtin:python-docs", metavar="FILE",
                   help="training text: a UTF-8 file or builtin:NAME (default builtin:python-docs)")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help=f"optimizer steps (default {DEFAULTS.steps})")
    p.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                   help=f"softmax temperature of the soft targets (default {DEFAULTS.temperature})")
    p.add_argument("--alpha", type=float, default=DEFAULTS.alpha,
                   help=f"weight of the KL term, 1 - alpha for the hard labels (default {DEFAULTS.alpha})")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help=f"peak AdamW learning rate (default {DEFAULTS.lr})")
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len,
                   help=f"tokens per training window (default {DEFAULTS.seq_len})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                   help=f"windows per step (default {DEFAULTS.batch_size})")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="order of the windows (default 0)")
    p.add_argument("--train-embeddings", action="store_true",
                   help="train the embedding (and a tied output head) too; by default they stay frozen")
    p.add_argument("--checkpoint-dir", metavar="FOLDER", default=None,
                   help="where checkpoints go (default: OUT.checkpoints next to OUT)")
    p.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints (default 10)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.add_argument("-o", "--output", required=True, metavar="FOLDER", help="folder to create")
    p.set_defaults(func=cmd_distill)
    return p


def parse_student_config(spec: str) -> int:
    """config:layers=N -> N."""
    from leapllm.errors import InvalidRequestError

    fields = dict(item.split("=", 1) for item in spec[len(STUDENT_CONFIG_PREFIX):].split(",") if "=" in item)
    if set(fields) != {"layers"} or not fields["layers"].isdigit():
        raise InvalidRequestError(f"unknown student config {spec!r}; write config:layers=N")
    return int(fields["layers"])


def check_float_student(model, where: str) -> None:
    from torch import nn

    from leapllm.model.quantized.layers import quantized_linears
    from leapllm.errors import InvalidRequestError

    if any(not isinstance(getattr(parent, attr), nn.Linear) for _, parent, attr in quantized_linears(model)):
        raise InvalidRequestError(f"{where} is quantized; distill a float model (quantize afterwards)")


def cmd_distill(args) -> int:
    import torch

    from leapllm.compression.distill import distill, student_from_teacher_layers
    from leapllm.tokenization.vocabulary import check_same_vocabulary
    from leapllm.loading.model_folder import (
        check_output_folder,
        float_tensors,
        save_model_folder,
    )
    from leapllm.errors import InvalidRequestError
    from leapllm.evaluation.texts import load_text
    from leapllm.loading.loader import load_model

    settings = DistillSettings(steps=args.steps, temperature=args.temperature, alpha=args.alpha, lr=args.lr,
                               seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                               train_embeddings=args.train_embeddings)
    settings.check()
    if threads_from_args(args) is not None:
        torch.set_num_threads(args.threads)
    out = check_output_folder(args.output)
    checkpoint = Path(args.checkpoint_dir) if args.checkpoint_dir else out.parent / f"{out.name}.checkpoints"
    if args.resume and not checkpoint.is_dir():
        raise InvalidRequestError(f"--resume: no checkpoint folder {checkpoint}")
    if not args.resume and checkpoint.exists() and any(checkpoint.iterdir()):
        raise InvalidRequestError(f"checkpoint folder {checkpoint} already exists: add --resume to continue "
                                  "that run, or remove it")
    student_layers = parse_student_config(args.student) if args.student.startswith(STUDENT_CONFIG_PREFIX) else None
    text = load_text(args.text)
    start = time.perf_counter()

    teacher = load_model(args.teacher, dtype="float32", device=args.device)
    check_float_student(teacher.model, "the teacher")
    if student_layers is not None:
        student_model = student_from_teacher_layers(teacher.model, student_layers)
        student_tokenizer, history = teacher.tokenizer, teacher.metadata.get("history", [])
        student_name = f"{teacher.path.name}, {student_layers} of its layers"
    else:
        student = load_model(args.student, dtype="float32", device=teacher.model.device)
        check_float_student(student.model, "the student")
        student_model, student_tokenizer = student.model, student.tokenizer
        history, student_name = student.metadata.get("history", []), student.path.name
    check_same_vocabulary(teacher.model, student_model, teacher.tokenizer, student_tokenizer)
    ids = teacher.tokenizer.encode(text)

    try:
        result = distill(teacher.model, student_model, ids, settings, checkpoint_dir=checkpoint,
                         checkpoint_every=args.checkpoint_every, resume=args.resume)
    except KeyboardInterrupt:
        if checkpoint.is_dir():
            print(f"leapllm: interrupted; the last checkpoint is in {checkpoint}: run the same command with "
                  "--resume to continue", file=sys.stderr)
        raise
    step = {"method": "distill", **{k: getattr(settings, k) for k in ("steps", "temperature", "alpha", "lr", "seq_len",
                                                                       "batch_size", "seed", "train_embeddings")},
            "teacher": teacher.path.name, "student": student_name, "text": args.text, "text_tokens": len(ids),
            "tokens_seen": result.tokens_seen, "final_loss": result.losses[-1], "first_loss": result.losses[0]}
    save_model_folder(out, student_model.config, student_tokenizer, float_tensors(student_model), None,
                      history + [step])
    shutil.rmtree(checkpoint, ignore_errors=True)  # the run is complete: OUT holds its result
    print(f"leapllm: wrote distilled model to {out} ({settings.steps} steps, loss {result.losses[0]:.3f} -> "
          f"{result.losses[-1]:.3f}, {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0
