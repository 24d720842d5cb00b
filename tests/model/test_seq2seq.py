"""The encoder-decoder (model/seq2seq.py) against transformers' T5, BART, mBART and Marian.

Random-weight models built from the real configs (tests/model/seq2seq_reference.py), saved as
safetensors folders and loaded by leapllm's loader: logits of the cached step-by-step decoder
against transformers' full forward, and every layer's attention probabilities against its eager
attention with output_attentions=True.
"""

from __future__ import annotations

import pytest
import torch

from leapllm.loading.seq2seq_loader import load_seq2seq
from leapllm.model.paged_kv_cache import build_cross_batch, build_paged_batch, slot_table
from leapllm.model.seq2seq import relative_position_bucket, sinusoidal_table
from tests.model.seq2seq_reference import REAL, reference, source_batch

MODELS = list(REAL)
TEXTS = ["the house is wonderful", "a cat", "we go home today and the dog runs fast", "sun moon tree"]


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    hf, folder = reference(request.param)
    loaded = load_seq2seq(folder)
    ids, mask = source_batch(folder, TEXTS, loaded.generation.pad_token_id)
    start = loaded.generation.decoder_start_token_id
    decoder_ids = torch.tensor([[start, 5, 9, 12, 7, 30], [start, 40, 41, 8, 8, 3],
                                [start, 11, 22, 33, 44, 55], [start, 6, 6, 6, 6, 6]])
    return request.param, hf, loaded, ids, mask, decoder_ids


def test_padded_batch_has_different_lengths(pair):
    _, _, _, ids, mask, _ = pair
    assert len(set(mask.sum(1).tolist())) > 1  # padding is exercised


def test_logits_match_transformers_full_forward(pair):
    name, hf, loaded, ids, mask, dec = pair
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = loaded.model(ids, mask, dec)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_cached_decode_steps_match_transformers_full_forward(pair):
    """Encoder once, then one decoder token per step through the self-attention cache."""
    name, hf, loaded, ids, mask, dec = pair
    model = loaded.model
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        cache = model.new_cache(model.encode(ids, mask), capacity=2)  # also grows past its planned room
        steps = [model.decode(dec[:, i:i + 1], cache).logits for i in range(dec.shape[1])]
    assert cache.length == dec.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), want, atol=1e-4, rtol=0)


def test_paged_serving_steps_match_transformers_full_forward(pair):
    """Sources encoded into the cross-attention pool, then decoder tokens flattened as the engine's
    steps run them: one sequence prefilled whole, one in two chunks, two one token a step."""
    name, hf, loaded, ids, mask, dec = pair
    model = loaded.model
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits  # (4, 6, vocab)
    bs, lengths = 4, mask.sum(1).tolist()
    per_source = -(-max(lengths) // bs)
    cache = model.new_paged_cache(num_blocks=8, num_source_blocks=4 * per_source, block_size=bs, kv_dtype="float32")
    source_tables = [list(range(i * per_source, (i + 1) * per_source)) for i in range(4)]
    tables = [[2 * i, 2 * i + 1] for i in range(4)]  # 6 decoder tokens: two blocks each
    with torch.inference_mode():
        model.encode_paged([ids[i, :n].tolist() for i, n in enumerate(lengths)],
                           [slot_table([t], n, bs, "cpu")[0] for t, n in zip(source_tables, lengths)], cache)
    got = torch.zeros_like(want)
    # Each step: decodes (sequence, position), then prefill chunks (sequence, first position, tokens).
    steps = [([], [(0, 0, 6), (1, 0, 3), (2, 0, 1), (3, 0, 1)]), ([(2, 1), (3, 1)], [(1, 3, 3)])]
    steps += [([(2, p), (3, p)], []) for p in range(2, 6)]
    for decodes, prefills in steps:
        batch = build_paged_batch([(tables[i], p) for i, p in decodes],
                                  [(tables[i], first, n) for i, first, n in prefills], bs, "cpu")
        pieces = [(i, p, 1) for i, p in decodes] + prefills
        batch.cross = build_cross_batch([(source_tables[i], lengths[i], n) for i, _, n in pieces], bs, "cpu")
        tokens = torch.cat([dec[i, first:first + n] for i, first, n in pieces])
        with torch.inference_mode():
            logits = model.forward_paged(tokens, cache, batch, torch.arange(tokens.shape[0]))
        row = 0
        for i, first, n in pieces:
            got[i, first:first + n] = logits[row:row + n]
            row += n
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_beam_expanded_cache_matches_unexpanded(pair):
    """Cross keys/values expanded per beam once give each beam its source's logits."""
    _, _, loaded, ids, mask, dec = pair
    model = loaded.model
    with torch.no_grad():
        encoded = model.encode(ids, mask)
        plain = model.decode(dec[:, :3], model.new_cache(encoded, 3)).logits
        beams = model.decode(dec[:, :3].repeat_interleave(3, dim=0), model.new_cache(encoded, 3, beams=3)).logits
    torch.testing.assert_close(beams, plain.repeat_interleave(3, dim=0), atol=1e-5, rtol=0)


def test_attention_maps_match_transformers_eager(pair):
    name, hf, loaded, ids, mask, dec = pair
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_attentions=True)
    maps = loaded.model.attention_maps(ids, dec, mask)
    for ours, theirs in (("encoder", out.encoder_attentions), ("decoder", out.decoder_attentions),
                         ("cross", out.cross_attentions)):
        assert len(maps[ours]) == len(theirs) == 2
        for got, want in zip(maps[ours], theirs, strict=True):
            assert got.shape == want.shape  # (batch, heads, q_len, k_len)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_attention_maps_leave_fast_path_logits_unchanged(pair):
    _, _, loaded, ids, mask, dec = pair
    model = loaded.model
    with torch.no_grad():
        encoded = model.encode(ids, mask, return_attention=True)
        slow = model.decode(dec, model.new_cache(encoded, 6), return_attention=True).logits
        fast = model(ids, mask, dec)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=0)


def test_t5_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 16)):
            want = T5Attention._relative_position_bucket(rel, bidirectional, buckets, distance)
            assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, distance), want)


def test_marian_sinusoids_match_transformers():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    for dim in (32, 33):
        table = MarianSinusoidalPositionalEmbedding(40, dim)
        torch.testing.assert_close(sinusoidal_table(40, dim), table.create_weight(), atol=1e-6, rtol=0)


def test_flan_t5_keeps_its_own_lm_head_and_t5_ties_with_rescale():
    flan = load_seq2seq(reference("flan-t5-small")[1]).model
    t5 = load_seq2seq(reference("t5-small")[1]).model
    assert not torch.equal(flan.lm_head.weight, flan.decoder.embed.tokens.weight)
    assert flan.output_scale == 1.0
    assert t5.lm_head.weight.data_ptr() == t5.decoder.embed.tokens.weight.data_ptr()
    assert t5.output_scale == pytest.approx(32 ** -0.5)
    assert flan.config.head_dim * flan.config.num_heads != flan.config.d_model  # flan's inner width kept
