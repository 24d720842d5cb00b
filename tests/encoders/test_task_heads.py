"""Pretrained task heads give transformers' pipelines' answers: text classification and token
classification against pipeline(...) itself, extractive QA against QuestionAnsweringPipeline's
steps (see reference_qa), on every family's tiny random-weight model (tiny_task_models.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import pipeline

from leapllm.encoders.question_answering import QuestionAnswerer
from leapllm.encoders.task_heads import PretrainedTextClassifier, load_task
from leapllm.encoders.token_classification import AGGREGATIONS, TokenClassifier
from leapllm.errors import InvalidRequestError, ModelLoadError
from tests.encoders.tiny_task_models import (
    CLASSIFY_TEXTS,
    CONTEXT,
    FAMILIES,
    NER_TEXTS,
    QA_PAIRS,
    one_torch_thread,
    task_folder,
)

SCORE_TOLERANCE = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # the pipeline warns about word heuristics for non-WordPiece tokenizers
        warnings.simplefilter("ignore")
        yield


def assert_same_results(got: list[dict], expected: list[dict]) -> None:
    """The same entries (every field equal, scores within the tolerance), in the same order."""
    assert len(got) == len(expected), (got, expected)
    for g, e in zip(got, expected, strict=True):
        assert {k: v for k, v in g.items() if k != "score"} == {k: v for k, v in e.items() if k != "score"}
        assert abs(g["score"] - float(e["score"])) < SCORE_TOLERANCE


# -- text classification -----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_classification_equals_the_text_classification_pipeline(family):
    folder, hf_model, tokenizer = task_folder(family, "text-classification")
    ours = load_task(folder)
    assert isinstance(ours, PretrainedTextClassifier)
    pipe = pipeline("text-classification", model=hf_model, tokenizer=tokenizer)
    texts = CLASSIFY_TEXTS  # the last one is longer than the model: both cut it to 64 tokens
    for top_k in (None, 1, 2):
        expected = pipe(texts, top_k=top_k, truncation=True)
        for got, exp in zip(ours.classify(texts, top_k=top_k), expected, strict=True):
            assert_same_results(got, exp)
    predictions = ours.predict(texts[:3])
    assert [p["label"] for p in predictions] == [r[0]["label"] for r in pipe(texts[:3], top_k=1)]
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-5 for p in predictions)  # softmax


@pytest.mark.parametrize("family, problem_type, num_labels, function", [
    ("roberta", "multi_label_classification", None, "sigmoid"),
    ("distilbert", None, 1, "sigmoid"),  # one output, no problem type: the pipeline's sigmoid
    ("albert", "regression", 1, "none"),
])
def test_multi_label_and_single_output_heads_score_as_the_pipeline(family, problem_type, num_labels, function):
    folder, hf_model, tokenizer = task_folder(family, "text-classification", problem_type, num_labels)
    ours = load_task(folder)
    assert ours.default_function == function
    expected = pipeline("text-classification", model=hf_model, tokenizer=tokenizer)(CLASSIFY_TEXTS[:-1], top_k=None)
    for got, exp in zip(ours.classify(CLASSIFY_TEXTS[:-1], top_k=None), expected, strict=True):
        assert_same_results(got, exp)


def test_long_text_is_refused_without_truncation():
    ours = load_task(task_folder("bert", "text-classification")[0])
    with pytest.raises(InvalidRequestError, match="input 1 has .* tokens; the model takes at most 64"):
        ours.classify(["short", CONTEXT], truncate=False)


# -- extractive question answering -------------------------------------------------------------
def reference_qa(model, tokenizer, question, context, top_k=1, doc_stride=None, max_seq_len=None, max_answer_len=15,
                 handle_impossible_answer=False):
    """transformers' QuestionAnsweringPipeline (4.57, fast tokenizer; transformers 5 dropped the pipeline):
    its preprocess, forward and postprocess steps, with transformers' own select_starts_ends."""
    from transformers.pipelines.document_question_answering import select_starts_ends

    max_seq_len = max_seq_len or min(tokenizer.model_max_length, 384)
    doc_stride = min(max_seq_len // 2, 128) if doc_stride is None else doc_stride
    enc = tokenizer(text=question, text_pair=context, padding="do_not_pad", truncation="only_second",
                    max_length=max_seq_len, stride=doc_stride, return_token_type_ids=True,
                    return_overflowing_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
    answers, min_null_score = [], 1000000
    for span in range(len(enc["input_ids"])):
        p_mask = [token != 1 for token in enc.sequence_ids(span)]
        for i, token_id in enumerate(enc["input_ids"][span]):
            if token_id == tokenizer.cls_token_id:
                p_mask[i] = 0  # the pipeline keeps [CLS] in the softmax
        with torch.no_grad():
            out = model(**{k: torch.tensor([enc[k][span]]) for k in tokenizer.model_input_names})
        starts, ends, scores, min_null_score = select_starts_ends(
            out.start_logits, out.end_logits, p_mask, np.array([enc["attention_mask"][span]]), min_null_score,
            top_k * 2 + 10, handle_impossible_answer, max_answer_len)
        encoding = enc[span]
        for s, e, score in zip(starts, ends, scores, strict=True):
            try:  # align_to_words, the pipeline's default
                first = encoding.word_to_chars(encoding.token_to_word(s), sequence_index=1)[0]
                last = encoding.word_to_chars(encoding.token_to_word(e), sequence_index=1)[1]
            except Exception:
                first, last = encoding.offsets[s][0], encoding.offsets[e][1]
            same = next((a for a in answers if a["answer"].lower() == context[first:last].lower()), None)
            if same:
                same["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": first, "end": last, "answer": context[first:last]})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    return sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]


@pytest.mark.parametrize("settings", [{}, {"top_k": 3}, {"top_k": 2, "doc_stride": 8, "max_seq_len": 40,
                                                          "max_answer_len": 5},
                                      {"handle_impossible_answer": True, "top_k": 2}],
                         ids=["defaults", "top3", "short-windows", "impossible"])
@pytest.mark.parametrize("family", FAMILIES)
def test_answers_equal_the_question_answering_pipeline(family, settings):
    folder, hf_model, tokenizer = task_folder(family, "question-answering")
    ours = load_task(folder)
    assert isinstance(ours, QuestionAnswerer)
    pairs = QA_PAIRS if not settings else [QA_PAIRS[i] for i in (0, 3, 4, 7)]  # all 12 pairs once per family
    questions, contexts = [q for q, _ in pairs], [c for _, c in pairs]
    assert len(ours.prepare(questions[:1], contexts[:1], settings.get("doc_stride"),
                            settings.get("max_seq_len")).features) > 2  # the long context: several windows
    got = ours.answer(questions, contexts, **settings)
    for question, context, answers in zip(questions, contexts, got, strict=True):
        expected = reference_qa(hf_model, tokenizer, question, context, **settings)
        assert_same_results(answers, expected)
        assert all(context[a["start"]:a["end"]] == a["answer"] for a in answers)


def test_one_context_serves_several_questions():
    qa = load_task(task_folder("bert", "question-answering")[0])
    questions = [q for q, _ in QA_PAIRS[:3]]
    assert qa.answer(questions, [CONTEXT]) == qa.answer(questions, [CONTEXT] * 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"doc_stride": 40, "max_seq_len": 40}, "doc_stride must be between 0 and max_seq_len - 1"),
    ({"max_seq_len": 65}, "max_seq_len must be between 3 and the model's 64 tokens"),
    ({"top_k": 0}, "top_k must be at least 1"),
    ({"max_answer_len": 0}, "max_answer_len must be at least 1"),
    ({"max_seq_len": 12}, "cannot tokenize the input"),  # the question alone fills the window
])
def test_impossible_qa_settings_are_refused(kwargs, message):
    qa = load_task(task_folder("bert", "question-answering")[0])
    with pytest.raises(InvalidRequestError, match=message):
        qa.answer(["What language is spoken in Brazil by most of its people today?"], [CONTEXT], **kwargs)


def test_questions_and_contexts_must_pair_up():
    qa = load_task(task_folder("bert", "question-answering")[0])
    with pytest.raises(InvalidRequestError, match="2 questions but 3 contexts"):
        qa.answer(["a?", "b?"], ["x", "y", "z"])
    with pytest.raises(InvalidRequestError, match="context 0 is empty"):
        qa.answer(["a?"], ["  "])


# -- token classification ----------------------------------------------------------------------
@pytest.mark.parametrize("strategy", AGGREGATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_entities_equal_the_token_classification_pipeline(family, strategy):
    folder, hf_model, tokenizer = task_folder(family, "token-classification")
    ours = load_task(folder)
    assert isinstance(ours, TokenClassifier)
    pipe = pipeline("token-classification", model=hf_model, tokenizer=tokenizer, aggregation_strategy=strategy)
    expected = pipe(NER_TEXTS)  # the last text is longer than the model: both cut it
    got = ours(NER_TEXTS, aggregation_strategy=strategy)
    assert sum(len(e) for e in expected) > 10  # enough entities (and words of several pieces) to compare
    for g, e in zip(got, expected, strict=True):
        assert_same_results(g, e)


@pytest.mark.parametrize("family, strategy, stride", [("bert", "first", 16), ("roberta", "max", 8),
                                                      ("xlm-roberta", "simple", 20), ("albert", "average", 12)])
def test_long_texts_in_strided_windows_equal_the_pipeline(family, strategy, stride):
    folder, hf_model, tokenizer = task_folder(family, "token-classification")
    pipe = pipeline("token-classification", model=hf_model, tokenizer=tokenizer, aggregation_strategy=strategy)
    got = load_task(folder)([CONTEXT, NER_TEXTS[0]], aggregation_strategy=strategy, stride=stride)
    for g, e in zip(got, pipe([CONTEXT, NER_TEXTS[0]], stride=stride), strict=True):
        assert_same_results(g, e)
    assert got[0][-1]["end"] > len(CONTEXT) - 20  # the windows reach the end of the text


def test_ignore_labels_keeps_o_tokens_when_empty():
    ner = load_task(task_folder("distilbert", "token-classification")[0])
    every = ner(NER_TEXTS[:2], aggregation_strategy="none", ignore_labels=[])
    default = ner(NER_TEXTS[:2], aggregation_strategy="none")
    assert len(every[0]) == len(ner.tokenizer.encode(NER_TEXTS[0]).ids) - 2  # every token but [CLS], [SEP]
    assert [e for e in every[0] if e["entity"] != "O"] == default[0]


@pytest.mark.parametrize("kwargs, message", [
    ({"aggregation_strategy": "mean"}, "aggregation_strategy must be one of"),
    ({"aggregation_strategy": "none", "stride": 8}, "stride reads long texts in windows"),
    ({"stride": 64}, "stride must be between 0 and 63"),
])
def test_bad_ner_settings_are_refused(kwargs, message):
    ner = load_task(task_folder("bert", "token-classification")[0])
    with pytest.raises(InvalidRequestError, match=message):
        ner(["Paris"], **kwargs)


def test_texts_are_checked_and_tasks_are_not_mixed():
    folder = task_folder("bert", "token-classification")[0]
    with pytest.raises(InvalidRequestError, match="input 1 is empty"):
        load_task(folder)(["ok", ""])
    with pytest.raises(ModelLoadError, match="a token-classification model"):
        load_task(folder, "question-answering")
