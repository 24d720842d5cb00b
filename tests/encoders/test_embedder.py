"""Sentence embeddings: agreement with transformers (and sentence-transformers when installed),
length bucketing, truncation, int8, and loading errors."""

from __future__ import annotations

import argparse
import json
import logging
import shutil

import numpy as np
import pytest
import torch

from leapllm.encoders.embedder import Embedder, length_buckets
from leapllm.errors import InvalidRequestError, ModelLoadError
from leapllm.loading.encoder_loader import default_encoder_path, load_encoder

# Sentences in the style of the STS benchmark's examples, other scripts, emoji, and a long text
# the project did not write: the docstring of Python's own argparse module.
ZEN = argparse.__doc__
TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
         "A man is riding a horse.", "Un homme mange de la nourriture.", "男人在吃东西。", "I love it 😍🔥",
         "x", ZEN]


def reference_embeddings(hf_encoder, texts):
    tok, model = hf_encoder
    with torch.no_grad():
        batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][:, :, None].float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()


def test_embeddings_match_transformers_within_1e_4(embedder, hf_encoder):
    ours = embedder.embed(TEXTS)
    ref = reference_embeddings(hf_encoder, TEXTS)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-4
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # the Normalize module is applied
    assert embedder.name == "all-MiniLM-L6-v2"


def test_token_ids_match_the_reference_tokenizer(embedder, hf_encoder):
    tok, _ = hf_encoder
    assert embedder.tokenize(TEXTS[:8]) == [tok(t)["input_ids"] for t in TEXTS[:8]]


def test_embeddings_match_sentence_transformers_if_installed(embedder):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(default_encoder_path()), device="cpu")
    assert np.abs(embedder.embed(TEXTS) - model.encode(TEXTS)).max() < 1e-4


def test_similar_sentences_are_closer_than_unrelated_ones(embedder):
    v = embedder.embed(TEXTS[:4])
    assert v[0] @ v[1] > v[0] @ v[2] and v[0] @ v[1] > v[0] @ v[3]


def test_bucketed_batches_give_the_same_vectors_in_the_callers_order(embedder):
    one_by_one = np.stack([embedder.embed([t])[0] for t in TEXTS])
    small_batches = Embedder(loaded=embedder.loaded, max_batch_size=3, max_batch_tokens=64)
    assert np.abs(small_batches.embed(TEXTS) - one_by_one).max() < 1e-5
    assert np.abs(embedder.embed(TEXTS) - one_by_one).max() < 1e-5


def test_length_buckets_group_similar_lengths_within_the_token_budget():
    lengths = [5, 100, 7, 98, 6, 99]
    batches = length_buckets(lengths, max_batch_size=8, max_batch_tokens=300)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert batches[0] == [1, 5, 3]  # the three long ones together, longest first
    assert all(len(b) * max(lengths[i] for i in b) <= 300 for b in batches)
    assert length_buckets([1000], 8, 10) == [[0]]  # a text longer than the budget still runs, alone


def test_over_length_text_is_truncated_with_a_warning_or_refused(embedder, caplog):
    long_text = ZEN * 4
    with caplog.at_level(logging.WARNING, logger="leapllm.encoders"):
        ids = embedder.tokenize([long_text])[0]
    assert len(ids) == embedder.max_tokens == 256 and ids[-1] == 102  # [SEP] kept
    assert "truncated" in caplog.text
    with pytest.raises(InvalidRequestError, match="at most 256"):
        embedder.tokenize([long_text], truncate=False)


@pytest.mark.parametrize("texts", [[""], ["ok", "   "], "a bare string", [3]])
def test_empty_or_non_text_inputs_are_refused(embedder, texts):
    with pytest.raises(InvalidRequestError):
        embedder.tokenize(texts)


def test_token_id_inputs_are_checked_against_the_vocabulary(embedder):
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        embedder.check_ids([[101, 10**6, 102]])
    with pytest.raises(InvalidRequestError, match="empty"):
        embedder.check_ids([[]])


def test_int8_embeddings_stay_close_to_float32(embedder):
    q = Embedder(quantize="int8")
    cos = (q.embed(TEXTS) * embedder.embed(TEXTS)).sum(1)
    assert cos.min() > 0.98
    assert q.quantization == "int8"
    with pytest.raises(InvalidRequestError):
        Embedder(loaded=embedder.loaded, quantize="int3")


def copy_encoder(tmp_path):
    folder = tmp_path / "enc"
    shutil.copytree(default_encoder_path(), folder)
    return folder


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ModelLoadError, match="folder"):
        load_encoder(tmp_path / "missing")
    folder = copy_encoder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="not a supported encoder"):
        load_encoder(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 7}))
    with pytest.raises(ModelLoadError, match="layer 6"):
        load_encoder(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_encoder(folder)
