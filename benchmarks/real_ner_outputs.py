"""A real trained NER model end to end: leapllm's entities beside the pipeline's and the model's own runtime's.

    python benchmarks/real_ner_outputs.py FOLDER [--onnx MODEL.onnx] [--int8] [TEXT ...]

FOLDER is a fine-tuned *ForTokenClassification folder, e.g. the Rampart PII model converted from its
ONNX file by benchmarks/convert_onnx_bert.py (see its docstring). Prints a markdown table: for each
text, the entities (aggregation "simple", label and words) of
- leapllm (float32; with --int8 also its int8 path),
- transformers' token-classification pipeline on the same folder,
- with --onnx: onnxruntime running the original ONNX file on the same token ids (the package's own
  runtime), its logits put through leapllm's aggregation, and the largest logit difference between
  it and leapllm's float32 over every token of the text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

TEXTS = [
    "My name is Maria Gonzalez and my email is maria.gonzalez@example.com.",
    "Call John Smith at 415-555-0132 before Friday.",
    "Ship the package to 1600 Pennsylvania Avenue NW, Washington, DC 20500.",
    "Please wire the money to account 000123456789, routing number 021000021.",
    "Her passport number is X12345678 and she lives in Boston, Massachusetts.",
    "Visit https://www.example.org/contact for more details.",
    "Dear Dr. Alan Turing, your appointment is confirmed.",
    "The invoice was sent to Priya Patel at 221B Baker Street, London.",
    "Contact our support team: support@acme-corp.io or +1 (212) 555-7788.",
    "Driver's license D1234567 was issued in Sacramento, California.",
    "Thanks, Wei Chen, apartment 4B, 350 Fifth Avenue, New York, NY 10118.",
    "The weather in Paris is lovely this time of year.",
]


def entities_text(entities: list[dict]) -> str:
    return "; ".join(f"{e['entity_group']}: {e['word']}" for e in entities) or "(none)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("texts", nargs="*")
    p.add_argument("--onnx", type=Path, default=None, help="the original ONNX file, run by onnxruntime")
    p.add_argument("--int8", action="store_true", help="also leapllm's int8 path")
    args = p.parse_args()
    texts = args.texts or TEXTS

    from transformers import pipeline

    from leapllm.encoders.task_heads import load_task

    ours = load_task(args.folder, "token-classification")
    job = ours.prepare(texts, aggregation_strategy="simple")
    logits = ours.forward(job.features)
    columns = {"leapllm": ours.decode(job, logits, "simple")}
    if args.int8:
        int8 = load_task(args.folder, "token-classification", quantize="int8")
        columns["leapllm int8"] = int8(texts, aggregation_strategy="simple")
    pipe = pipeline("token-classification", model=str(args.folder), tokenizer=str(args.folder), device="cpu",
                    aggregation_strategy="simple")
    columns["transformers pipeline"] = [[{"entity_group": e["entity_group"], "word": e["word"]} for e in text]
                                        for text in pipe(texts)]
    differences = None
    if args.onnx is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(args.onnx), providers=["CPUExecutionProvider"])
        theirs = []
        for window in (w for text in job.windows for w in text):
            ids = np.array([window.ids], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
            theirs.append(session.run(["logits"], feeds)[0][0])
        columns["onnxruntime (the package's model)"] = ours.decode(job, theirs, "simple")
        differences = [float(np.abs(a - b).max()) for a, b in zip(logits, theirs, strict=True)]

    names = list(columns)
    last = " | max logit difference, leapllm vs onnxruntime |" if differences else " |"
    print("| text | " + " | ".join(names) + last)
    print("|---" * (len(names) + 1 + bool(differences)) + "|")
    for i, text in enumerate(texts):
        cells = [entities_text(columns[n][i]) for n in names]
        if differences:
            cells.append(f"{differences[i]:.1e}")
        print(f"| {text} | " + " | ".join(cells) + " |")
    same = {n: sum(entities_text(a) == entities_text(b) for a, b in zip(columns[n], columns["leapllm"], strict=True))
            for n in names[1:]}
    print("\nSame entities as leapllm float32: " + ", ".join(f"{n} {k}/{len(texts)}" for n, k in same.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
