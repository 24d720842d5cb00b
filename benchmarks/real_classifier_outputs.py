"""A real trained classifier end to end: leapllm's labels and scores next to transformers' pipeline's.

    python benchmarks/real_classifier_outputs.py FOLDER [TEXT ...]

FOLDER is a fine-tuned *ForSequenceClassification folder, e.g. categorium's English topic classifier
converted by benchmarks/convert_keras_bert.py (see its docstring). Prints a markdown table: for each
text, leapllm's top label and score, the pipeline's, and the largest score difference over all labels.
The default texts are written as categorium's training data was prepared (lowercase, digits as NUM,
no punctuation).
"""

from __future__ import annotations

import sys

TEXTS = [
    "invest in stocks bonds and mutual funds for retirement",
    "doctors recommend regular exercise to lower blood pressure and prevent heart disease",
    "new car review engine horsepower and fuel economy of the sedan",
    "preheat the oven and bake the chicken with garlic lemon and rosemary for NUM minutes",
    "cheap flights and hotel deals for your summer holiday in spain",
    "the new smartphone has a faster processor and a better camera",
    "adopt a puppy our shelter has dogs and cats looking for a loving home",
    "the team won the championship final last night with a late goal",
]


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    folder, texts = sys.argv[1], sys.argv[2:] or TEXTS
    from transformers import pipeline

    from leapllm.encoders.task_heads import load_task

    ours = load_task(folder, "text-classification").classify(texts, top_k=None)
    theirs = pipeline("text-classification", model=folder, tokenizer=folder, device="cpu")(texts, top_k=None)
    print("| text | leapllm | transformers pipeline | max score difference |")
    print("|---|---|---|---|")
    for text, a, b in zip(texts, ours, theirs, strict=True):
        scores = {r["label"]: r["score"] for r in b}
        diff = max(abs(r["score"] - scores[r["label"]]) for r in a)
        print(f"| {text} | {a[0]['label']} {a[0]['score']:.4f} | {b[0]['label']} {b[0]['score']:.4f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
