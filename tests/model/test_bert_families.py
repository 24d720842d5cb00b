"""The BERT-family encoders (BERT, DistilBERT, RoBERTa, XLM-R, ALBERT) and their task heads against
transformers, on tiny random-weight models built from each family's real config
(tests/encoders/tiny_task_models.py): hidden states, attention probabilities, head logits."""

from __future__ import annotations

import pytest
import torch

from leapllm.errors import ModelLoadError
from leapllm.loading.encoder_loader import load_encoder, load_task_model
from tests.encoders.tiny_task_models import FAMILIES, NER_TEXTS, QA_PAIRS, one_torch_thread, task_folder

TEXTS = NER_TEXTS[:6]
TASKS = ("text-classification", "question-answering", "token-classification")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


def hf_batch(tokenizer, pairs: bool = False):
    """A padded batch as transformers' tokenizer makes it: single texts, or question/context pairs
    (token types 0 and 1 where the family has them)."""
    if pairs:
        return tokenizer([q for q, _ in QA_PAIRS[3:9]], [c for _, c in QA_PAIRS[3:9]], padding=True,
                         truncation="only_second", return_tensors="pt")
    return tokenizer(TEXTS, padding=True, return_tensors="pt")


def run_ours(model, batch, **kwargs):
    return model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), **kwargs)


@pytest.mark.parametrize("pairs", [False, True], ids=["texts", "pairs"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_match_transformers_within_1e_4(family, pairs):
    folder, hf_model, tokenizer = task_folder(family, "base")
    ours = load_encoder(folder).model
    batch = hf_batch(tokenizer, pairs)
    with torch.no_grad():
        expected = hf_model(**batch).last_hidden_state
        got = run_ours(ours, batch)
    real = batch["attention_mask"].bool()  # padded positions are nobody's output
    assert got.shape == expected.shape
    assert (got - expected)[real].abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_probabilities_match_eager_output_attentions(family):
    folder, hf_model, tokenizer = task_folder(family, "base")
    ours = load_encoder(folder).model
    batch = hf_batch(tokenizer)
    with torch.no_grad():
        expected = hf_model(**batch, output_attentions=True).attentions
        hidden, attentions = run_ours(ours, batch, return_attention=True)
        fast = run_ours(ours, batch)  # the SDPA path, which never forms the probabilities
    assert len(attentions) == len(expected) == 2
    real = batch["attention_mask"].bool()
    for got, ref in zip(attentions, expected, strict=True):
        assert got.shape == ref.shape  # (batch, heads, seq, seq)
        assert (got - ref).permute(0, 2, 1, 3)[real].abs().max() < 1e-5  # every real query row
        assert torch.allclose(got.sum(-1), torch.ones(()))
        assert got.masked_select(~real[:, None, None, :]).abs().max() == 0  # padding gets no attention
    assert (hidden - fast)[real].abs().max() < 1e-5


def test_albert_runs_its_one_shared_layer_num_hidden_layers_times():
    folder, _, _ = task_folder("albert", "base")
    model = load_encoder(folder).model
    assert len(model.layers) == 1 and model.layer_schedule == [0, 0]
    assert model.embedding_projection.in_features == 16 and model.embedding_projection.out_features == 32


def test_distilbert_has_no_token_types_and_roberta_counts_positions_from_pad():
    distilbert = load_encoder(task_folder("distilbert", "base")[0]).model
    roberta = load_encoder(task_folder("roberta", "base")[0]).model
    assert distilbert.embeddings.token_type_embeddings is None
    assert roberta.config.position_offset == 2 and roberta.config.max_tokens == 64


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_head_logits_match_transformers_within_1e_4(family, task):
    folder, hf_model, tokenizer = task_folder(family, task)
    loaded = load_task_model(folder)
    assert loaded.task == task and loaded.architecture == type(hf_model).__name__
    batch = hf_batch(tokenizer, pairs=task == "question-answering")
    with torch.no_grad():
        out = hf_model(**batch)
        got = run_ours(loaded.model, batch)
    real = batch["attention_mask"].bool()
    if task == "text-classification":
        assert got.shape == out.logits.shape and (got - out.logits).abs().max() < 1e-4
    elif task == "question-answering":
        assert (got[..., 0] - out.start_logits)[real].abs().max() < 1e-4
        assert (got[..., 1] - out.end_logits)[real].abs().max() < 1e-4
    else:
        assert (got - out.logits)[real].abs().max() < 1e-4


def test_labels_and_problem_type_come_from_the_config():
    loaded = load_task_model(task_folder("bert", "text-classification", "multi_label_classification")[0])
    assert loaded.labels == ["negative", "neutral", "positive"]
    assert loaded.problem_type == "multi_label_classification"
    assert loaded.special_ids["cls"] == loaded.tokenizer.token_to_id("[CLS]")


def test_a_folder_of_another_task_or_without_a_head_is_refused():
    with pytest.raises(ModelLoadError, match="a question-answering model .*not a token-classification one"):
        load_task_model(task_folder("bert", "question-answering")[0], "token-classification")
    with pytest.raises(ModelLoadError, match="name no task head"):
        load_task_model(task_folder("bert", "base")[0])
