"""Pretrained task heads: load a fine-tuned Hugging Face encoder folder and run its task the way
transformers' pipelines do, with the same answers.

    task = load_task("./distilbert-sst2")     # the folder's architectures say which task
    task.classify(["I loved this film"])      # [[{"label": "POSITIVE", "score": 0.9998}]]
    qa = load_task("./roberta-squad2")        # -> QuestionAnswerer (question_answering.py)
    ner = load_task("./bert-conll03")         # -> TokenClassifier (token_classification.py)

Text classification (*ForSequenceClassification), as TextClassificationPipeline: the scores are a
softmax over the labels, a sigmoid per label for `problem_type: multi_label_classification` and
for single-output models, and the raw logits for `problem_type: regression`; labels come from
id2label, best first, `top_k` of them (None: all). `predict` gives the shape of leapllm's own
trained classifiers (label, score, scores), so /v1/classify and `classify predict` serve both.

Texts longer than the model takes are cut to its limit (the closing special token kept), or
refused with truncate=False. Several texts share padded, length-bucketed forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leapllm.encoders.question_answering import QuestionAnswerer
from leapllm.encoders.task_runner import Feature, TaskRunner, check_texts, sigmoid, softmax
from leapllm.encoders.token_classification import TokenClassifier
from leapllm.errors import InvalidRequestError
from leapllm.loading.encoder_loader import load_task_model

SCORE_FUNCTIONS = ("softmax", "sigmoid", "none")


class PretrainedTextClassifier(TaskRunner):
    task = "text-classification"
    per_token = False

    @property
    def default_function(self) -> str:
        """The pipeline's choice of score function for this model's config."""
        problem = self.loaded.problem_type
        if problem == "regression":
            return "none"
        if problem == "multi_label_classification" or len(self.labels) == 1:
            return "sigmoid"
        return "softmax"

    def features(self, texts: Sequence[str], truncate: bool = True,
                 pairs: Sequence[str] | None = None) -> list[Feature]:
        texts = check_texts(texts)
        inputs: list = texts
        if pairs is not None:
            pairs = check_texts(pairs, "text pair")
            if len(pairs) != len(texts):
                raise InvalidRequestError(f"{len(texts)} texts but {len(pairs)} text pairs")
            inputs = list(zip(texts, pairs, strict=True))
        encodings = self.encode(inputs, {"max_length": self.max_tokens} if truncate else None)
        for i, enc in enumerate(encodings):
            if len(enc.ids) > self.max_tokens:
                raise InvalidRequestError(f"input {i} has {len(enc.ids)} tokens; the model takes at most "
                                          f"{self.max_tokens} (allow truncation to cut it)")
        return [Feature.of(enc) for enc in encodings]

    def scores(self, logits: Sequence[np.ndarray], function_to_apply: str | None = None) -> np.ndarray:
        """(texts, labels) scores of the head's logits, by the pipeline's function."""
        function = function_to_apply or self.default_function
        if function not in SCORE_FUNCTIONS:
            raise InvalidRequestError(f"function_to_apply must be one of {', '.join(SCORE_FUNCTIONS)}, "
                                      f"got {function!r}")
        logits = np.stack(logits).astype(np.float32)
        if function == "softmax":
            return softmax(logits)
        return sigmoid(logits) if function == "sigmoid" else logits

    def ranked(self, scores: np.ndarray, top_k: int | None = 1) -> list[list[dict]]:
        """Per text: [{"label", "score"}], best first, top_k of them (None: every label)."""
        if top_k is not None and top_k < 1:
            raise InvalidRequestError(f"top_k must be at least 1, got {top_k}")
        out = []
        for row in scores:
            ranked = sorted(({"label": self.labels[i], "score": float(s)} for i, s in enumerate(row)),
                            key=lambda r: r["score"], reverse=True)  # stable: ties keep the label order
            out.append(ranked if top_k is None else ranked[:top_k])
        return out

    def classify(self, texts: Sequence[str], top_k: int | None = 1, function_to_apply: str | None = None,
                 truncate: bool = True, pairs: Sequence[str] | None = None) -> list[list[dict]]:
        """TextClassificationPipeline(texts, top_k=...): per text, the top_k labels with their scores."""
        scores = self.scores(self.forward(self.features(texts, truncate, pairs)), function_to_apply)
        return self.ranked(scores, top_k)

    def predict_proba(self, texts: Sequence[str], truncate: bool = True) -> np.ndarray:
        """(texts, labels) float32 scores, in the order of self.labels."""
        return self.scores(self.forward(self.features(texts, truncate)))

    def predict(self, texts: Sequence[str], truncate: bool = True) -> list[dict]:
        """As TextClassifier.predict: per text, the best label, its score and every label's score."""
        return self.as_predictions(self.predict_proba(texts, truncate))

    def as_predictions(self, scores: np.ndarray) -> list[dict]:
        out = []
        for row in scores:
            best = int(row.argmax())
            out.append({"label": self.labels[best], "score": float(row[best]),
                        "scores": {label: float(s) for label, s in zip(self.labels, row, strict=True)}})
        return out


def load_task(path: str | Path, task: str | None = None, **kwargs) -> TaskRunner:
    """The runner of a fine-tuned folder's task: PretrainedTextClassifier, QuestionAnswerer or
    TokenClassifier (keyword arguments: TaskRunner's). With task, another task's folder is refused."""
    loaded = load_task_model(path, task, dtype=kwargs.pop("dtype", "float32"), device=kwargs.pop("device", "cpu"))
    runner = {"text-classification": PretrainedTextClassifier, "question-answering": QuestionAnswerer,
              "token-classification": TokenClassifier}[loaded.task]
    return runner(loaded=loaded, **kwargs)
