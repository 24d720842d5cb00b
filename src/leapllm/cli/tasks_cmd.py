"""`leapllm qa` and `leapllm ner`: a fine-tuned encoder's task head from the command line, JSON lines out.

    leapllm qa --model ./roberta-squad2 --context article.txt "Who wrote it?" "When?"
        [--top-k K] [--doc-stride N] [--max-seq-len N] [--max-answer-len N] [--handle-impossible-answer]
    leapllm ner --model ./bert-conll03 "Angela Merkel met Emmanuel Macron in Paris." [--input FILE]
        [--aggregation none|simple|first|average|max] [--stride N] [--ignore-labels O,MISC]

`qa` answers each question from the --context file (- for stdin), one line per question:
{"question", "answer", "score", "start", "end"}, and with --top-k K "answers": the K best.
`ner` writes one line per text: {"text", "entities": [...]} as transformers' token-classification
pipeline gives them (aggregation simple unless told). Its texts are the arguments, else the lines
of --input or of stdin (blank lines skipped). Text classification with a fine-tuned folder is
`leapllm classify predict --model FOLDER TEXT ...`. Bad input is one `leapllm: error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from leapllm.cli.args import threads_from_args
from leapllm.cli.common import read_text_input
from leapllm.errors import InvalidRequestError


def add_task_parsers(subparsers) -> None:
    q = subparsers.add_parser("qa", help="extractive question answering with a fine-tuned encoder (JSONL out)",
                              description="Answer questions from a context with a Hugging Face "
                                          "*ForQuestionAnswering folder, as transformers' question-answering "
                                          "pipeline does.")
    q.add_argument("questions", nargs="+", metavar="QUESTION", help="questions about the context")
    q.add_argument("--model", required=True, metavar="FOLDER", help="a *ForQuestionAnswering model folder")
    q.add_argument("--context", required=True, metavar="FILE", help="UTF-8 text file holding the context (- for stdin)")
    q.add_argument("--top-k", type=int, default=1, metavar="K", help="answers per question (default 1)")
    q.add_argument("--doc-stride", type=int, default=None, metavar="N",
                   help="tokens of overlap between the windows of a long context (default min(max-seq-len / 2, 128))")
    q.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="tokens per window, question included (default min(384, the model's limit))")
    q.add_argument("--max-answer-len", type=int, default=15, metavar="N", help="longest answer in tokens (default 15)")
    q.add_argument("--handle-impossible-answer", action="store_true", help="allow the empty answer (no answer)")
    _add_runtime_args(q)
    q.set_defaults(func=cmd_qa)

    n = subparsers.add_parser("ner", help="named entities / token classification with a fine-tuned encoder "
                                          "(JSONL out)",
                              description="Label the tokens of texts with a Hugging Face *ForTokenClassification "
                                          "folder and group them into entities, as transformers' "
                                          "token-classification pipeline does.")
    n.add_argument("texts", nargs="*", metavar="TEXT", help="texts (default: the lines of --input or stdin)")
    n.add_argument("--model", required=True, metavar="FOLDER", help="a *ForTokenClassification model folder")
    n.add_argument("--input", metavar="FILE", help="text file, one text per line")
    n.add_argument("--aggregation", default="simple", choices=["none", "simple", "first", "average", "max"],
                   help="how tokens become entities (default: simple)")
    n.add_argument("--stride", type=int, default=None, metavar="N",
                   help="read texts longer than the model in windows overlapping by N tokens (default: cut them)")
    n.add_argument("--ignore-labels", default="O", metavar="LABELS",
                   help="comma-separated labels to leave out (default: O; '' keeps every label)")
    _add_runtime_args(n)
    n.set_defaults(func=cmd_ner)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 encoder linear layers")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")


def _load(args, task: str):
    threads = threads_from_args(args)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from leapllm.encoders.task_heads import load_task

    return load_task(args.model, task, device=args.device, quantize=args.quantize)


def _write_lines(rows: list[dict]) -> None:
    sys.stdout.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    sys.stdout.flush()


def cmd_qa(args) -> int:
    context = read_text_input(args.context, "--context")
    if not context.strip():
        raise InvalidRequestError(f"the context {args.context} is empty")
    qa = _load(args, "question-answering")
    answers = qa.answer(args.questions, [context], top_k=args.top_k, doc_stride=args.doc_stride,
                        max_seq_len=args.max_seq_len, max_answer_len=args.max_answer_len,
                        handle_impossible_answer=args.handle_impossible_answer)
    rows = []
    for question, found in zip(args.questions, answers, strict=True):
        best = found[0] if found else {"answer": "", "score": 0.0, "start": 0, "end": 0}
        row = {"question": question, "answer": best["answer"], "score": best["score"], "start": best["start"],
               "end": best["end"]}
        if args.top_k > 1:
            row["answers"] = found
        rows.append(row)
    _write_lines(rows)
    return 0


def cmd_ner(args) -> int:
    if args.texts:
        if args.input:
            raise InvalidRequestError("give texts as arguments or with --input, not both")
        texts = list(args.texts)
    else:
        source = args.input or "-"
        texts = [line for line in read_text_input(source, "--input").splitlines() if line.strip()]
        if not texts:
            raise InvalidRequestError(f"no texts in {'stdin' if source == '-' else source}")
    ignore = [label.strip() for label in args.ignore_labels.split(",") if label.strip()]
    ner = _load(args, "token-classification")
    entities = ner(texts, aggregation_strategy=args.aggregation, stride=args.stride, ignore_labels=ignore)
    _write_lines([{"text": text, "entities": found} for text, found in zip(texts, entities, strict=True)])
    return 0
