"""Extractive question answering (*ForQuestionAnswering folders), as transformers'
QuestionAnsweringPipeline does it.

    qa = QuestionAnswerer("./roberta-squad2")
    qa.answer(["Where do I live?"], ["My name is Wolfgang and I live in Berlin"])
    # [[{"score": 0.919, "start": 34, "end": 40, "answer": "Berlin"}]]

Each (question, context) pair is tokenized question first, truncating only the context, into
windows of at most `max_seq_len` tokens (default min(384, the model's limit)) that overlap by
`doc_stride` tokens (default min(max_seq_len // 2, 128)), so a context longer than the model is
read whole. Per window, the start and end logits of the tokens that cannot start or end an answer
(the question, special tokens; the [CLS] token stays in the softmax, as some models score "no
answer" there) are pushed to -10000, both are softmaxed, and a span's score is P(start) x P(end)
for start <= end < start + max_answer_len. The best spans of every window (top_k * 2 + 10 of
them) are mapped back to the context's characters through the tokenizer's offsets, widened to
whole words (align_to_words), and spans that give the same text (case-insensitively) add their
scores up. The top_k answers across windows come back, best first.

Unlike the pipeline, a window with fewer possible spans than it looks at never yields the
zero-score, end-before-start "answers" the pipeline can pad its list with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding

from leapllm.encoders.task_runner import Feature, TaskRunner, check_texts
from leapllm.errors import InvalidRequestError

DEFAULT_MAX_SEQ_LEN = 384
DEFAULT_MAX_ANSWER_LEN = 15
MASKED_LOGIT = -10000.0  # the pipeline's value for tokens outside the context


@dataclass
class QAJob:
    """The tokenized pairs of one call: each pair's context and windows, and all windows as features."""
    contexts: list[str]
    windows: list[list[Encoding]]  # per pair
    features: list[Feature]  # every window of every pair, in order


class QuestionAnswerer(TaskRunner):
    task = "question-answering"

    def prepare(self, questions: Sequence[str], contexts: Sequence[str], doc_stride: int | None = None,
                max_seq_len: int | None = None) -> QAJob:
        questions, contexts = check_texts(questions, "question"), check_texts(contexts, "context")
        if len(contexts) == 1 and len(questions) > 1:
            contexts = contexts * len(questions)  # several questions about one context
        if len(questions) != len(contexts):
            raise InvalidRequestError(f"{len(questions)} questions but {len(contexts)} contexts")
        if max_seq_len is None:
            max_seq_len = min(self.max_tokens, DEFAULT_MAX_SEQ_LEN)
        if not 2 < max_seq_len <= self.max_tokens:
            raise InvalidRequestError(f"max_seq_len must be between 3 and the model's {self.max_tokens} tokens, "
                                      f"got {max_seq_len}")
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, 128)
        if not 0 <= doc_stride < max_seq_len:
            raise InvalidRequestError(f"doc_stride must be between 0 and max_seq_len - 1 ({max_seq_len - 1}), "
                                      f"got {doc_stride}")
        truncation = {"max_length": max_seq_len, "stride": doc_stride, "strategy": "only_second"}
        encodings = self.encode(list(zip(questions, contexts, strict=True)), truncation)
        windows = [[enc, *enc.overflowing] for enc in encodings]
        return QAJob(contexts, windows, [Feature.of(w) for pair in windows for w in pair])

    def decode(self, job: QAJob, outputs: Sequence[np.ndarray], top_k: int = 1,
               max_answer_len: int = DEFAULT_MAX_ANSWER_LEN, handle_impossible_answer: bool = False,
               align_to_words: bool = True) -> list[list[dict]]:
        """Per pair, its top_k answers {"score", "start", "end", "answer"}, best first."""
        check_answer_settings(top_k, max_answer_len)
        cls_id = self.loaded.special_ids.get("cls")
        results, next_output = [], 0
        for context, windows in zip(job.contexts, job.windows, strict=True):
            answers: list[dict] = []
            null_score = 1_000_000.0  # the pipeline's "large and positive" start
            for window in windows:
                logits = outputs[next_output]
                next_output += 1
                spans, window_null = best_spans(window, logits, cls_id, top_k * 2 + 10 if align_to_words else top_k,
                                                max_answer_len)
                null_score = min(null_score, window_null)
                for start, end, score in spans:
                    first, last = char_span(window, start, end, align_to_words)
                    text = context[first:last]
                    same = next((a for a in answers if a["answer"].lower() == text.lower()), None)
                    if same is not None:
                        same["score"] += score
                    else:
                        answers.append({"score": score, "start": first, "end": last, "answer": text})
            if handle_impossible_answer:
                answers.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
            results.append(sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k])
        return results

    def answer(self, questions: Sequence[str], contexts: Sequence[str], top_k: int = 1,
               doc_stride: int | None = None, max_seq_len: int | None = None,
               max_answer_len: int = DEFAULT_MAX_ANSWER_LEN, handle_impossible_answer: bool = False,
               align_to_words: bool = True) -> list[list[dict]]:
        """QuestionAnsweringPipeline(question=..., context=...): per pair, its top_k answers."""
        check_answer_settings(top_k, max_answer_len)
        job = self.prepare(questions, contexts, doc_stride, max_seq_len)
        return self.decode(job, self.forward(job.features), top_k, max_answer_len, handle_impossible_answer,
                           align_to_words)


def check_answer_settings(top_k: int, max_answer_len: int) -> None:
    if top_k < 1:
        raise InvalidRequestError(f"top_k must be at least 1, got {top_k}")
    if max_answer_len < 1:
        raise InvalidRequestError(f"max_answer_len must be at least 1, got {max_answer_len}")


def best_spans(window: Encoding, logits: np.ndarray, cls_id: int | None, count: int,
               max_answer_len: int) -> tuple[list[tuple[int, int, float]], float]:
    """The window's `count` best (start token, end token, score) spans, best first, and its "no answer"
    score (P(start = 0) x P(end = 0))."""
    ids = np.asarray(window.ids)
    in_context = np.array([s == 1 for s in window.sequence_ids])  # the context is the pair's second text
    allowed = in_context | (ids == cls_id) if cls_id is not None else in_context
    start = _masked_softmax(logits[:, 0], allowed)
    end = _masked_softmax(logits[:, 1], allowed)
    null_score = float(start[0] * end[0])
    start[0] = end[0] = 0.0  # the first token ([CLS]) is never an answer
    # (start, end) scores with start <= end < start + max_answer_len, both in the context.
    scores = np.tril(np.triu(np.outer(start, end)), max_answer_len - 1)
    scores[~allowed, :] = 0.0
    scores[:, ~allowed] = 0.0
    flat = scores.ravel()
    candidates = np.flatnonzero(flat > 0)
    best = candidates[np.argsort(-flat[candidates], kind="stable")[:count]]
    starts, ends = np.unravel_index(best, scores.shape)
    return [(int(s), int(e), float(flat[i])) for s, e, i in zip(starts, ends, best, strict=True)], null_score


def _masked_softmax(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    x = np.where(allowed, logits.astype(np.float32), np.float32(MASKED_LOGIT))
    x = np.exp(x - x.max())
    return x / x.sum()


def char_span(window: Encoding, start: int, end: int, align_to_words: bool) -> tuple[int, int]:
    """The context characters [first, last) of tokens start..end: whole words when align_to_words and
    the tokenizer knows its words, else the tokens' own offsets."""
    if align_to_words:
        start_word, end_word = window.token_to_word(start), window.token_to_word(end)
        if start_word is not None and end_word is not None:
            first = window.word_to_chars(start_word, sequence_index=1)
            last = window.word_to_chars(end_word, sequence_index=1)
            if first is not None and last is not None:
                return first[0], last[1]
    return window.offsets[start][0], window.offsets[end][1]
