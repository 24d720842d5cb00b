"""Attention maps: `LLM.attention`, the page `leapllm attention --html` writes, and that page in a real
Chromium. (Each family's probabilities against transformers: tests/model/test_families.py.)"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

from leapllm.cli import common
from leapllm.cli.main import main
from leapllm.errors import InvalidRequestError
from leapllm.evaluation.attention_page import render_attention_page, write_attention_page
from leapllm.llm import MAX_ATTENTION_TOKENS
from leapllm.model.attention import AttentionMaps
from tests.browser import open_page, screenshot
from tests.cli_helpers import assert_one_line_error

TEXT = ("The quick brown fox jumps over the lazy dog. The dog did not move, because it was asleep in the warm "
        "sun. Later that day, the fox came back and found the dog still sleeping under the old oak tree.")


@pytest.fixture(scope="module")
def maps(llm) -> list[AttentionMaps]:
    return llm.attention(TEXT)


def page_json(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="attention-data">(.*?)</script>', page, re.S)[1])


def test_each_layer_gives_each_head_a_causal_distribution_over_the_tokens(llm, maps):
    (self_attention,) = maps
    ids = llm.encode(TEXT)
    assert self_attention.kind == "self"
    assert self_attention.query_tokens == self_attention.key_tokens == [llm.tokenizer.decode([t]) for t in ids]
    assert len(self_attention.layers) == llm.config.num_layers
    n = len(ids)
    for layer in self_attention.layers:
        assert layer.shape == (llm.config.num_heads, n, n) and layer.dtype == torch.float32
        torch.testing.assert_close(layer.sum(-1), torch.ones(llm.config.num_heads, n))
        assert layer.triu(1).abs().max() == 0  # no token looks ahead
    assert not any(layer.attn.core._forward_pre_hooks for layer in llm.model.layers)  # generation runs hook-free


def test_attention_refuses_an_empty_or_too_long_prompt(llm):
    with pytest.raises(InvalidRequestError, match="no tokens"):
        llm.attention("")
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_ATTENTION_TOKENS}"):
        llm.attention(list(range(MAX_ATTENTION_TOKENS + 1)))


def test_the_page_carries_every_probability_to_within_its_one_byte_encoding(maps):
    data = page_json(render_attention_page(maps, "t"))
    (kind,) = data["kinds"]
    layers = maps[0].layers
    assert kind["heads"] == [layer.shape[0] for layer in layers]
    shades = np.frombuffer(base64.b64decode(kind["data"]), dtype=np.uint8)
    expected = torch.cat([layer.flatten() for layer in layers]).numpy()
    assert shades.shape == expected.shape
    decoded = (shades / 255.0) ** 2
    # One byte of sqrt(p): a step of 1/255 in sqrt(p) is at most 2 sqrt(p)/255 + 1/255^2 in p.
    assert np.all(np.abs(decoded - expected) <= np.sqrt(expected) / 255 + 1 / 255**2 + 1e-6)


def test_a_token_with_markup_stays_data_inside_the_page():
    tokens = ["</script><script>alert(1)</script>", "<b>x</b>", "&amp;"]
    probs = torch.softmax(torch.randn(2, 3, 3), -1)
    page = render_attention_page([AttentionMaps("self", tokens, tokens, [probs])], "<title>")
    assert "</script><script>alert" not in page and "<b>x</b>" not in page
    assert page_json(page)["kinds"][0]["query_tokens"] == tokens
    assert "<title>&lt;title&gt;</title>" in page


def test_a_map_that_does_not_fit_its_tokens_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        render_attention_page([AttentionMaps("self", ["a", "b"], ["a", "b"], [torch.ones(1, 3, 2) / 2])], "t")


@pytest.mark.slow
def test_the_page_shows_every_head_and_the_clicked_heads_weights_in_chromium(maps, browser, page_errors, tmp_path):
    path = write_attention_page(maps, tmp_path / "attention.html", "Attention of SmolLM2-135M-Instruct",
                                f"{len(maps[0].query_tokens)} tokens")
    page = open_page(browser, path.as_uri(), page_errors)
    layers = maps[0].layers
    heads = layers[0].shape[0]
    assert page.locator("#grid canvas").count() == len(layers) * (heads + 1)  # every head, and each layer's mean
    layer, head = 5, 4
    page.locator(f'#grid canvas[data-layer="{layer}"][data-head="{head}"]').click()
    assert page.locator("#detail-title").inner_text() == f"self attention, layer {layer}, head {head}"
    query = 30
    page.locator("#keys span").nth(query).hover()
    shown = page.locator("#top li").all_inner_texts()
    row = layers[layer][head, query]
    assert len(shown) == 5
    # Each line is 'query -> key (index): weight'; near-equal small weights may come in either order.
    shown_weights = []
    for text in shown:
        index, weight = re.search(r"\((\d+)\): ([0-9.]+)$", text).groups()
        assert abs(float(weight) - row[int(index)].item()) < 0.01, text
        shown_weights.append(float(weight))
    np.testing.assert_allclose(shown_weights, row.topk(5).values.numpy(), atol=0.01)
    assert page.locator("#keys span.q").inner_text() == maps[0].key_tokens[query]
    screenshot(page, "attention.png", tmp_path)
    assert page_errors == []


def test_the_cli_writes_the_page_and_the_json(llm, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "load_llm", lambda args: llm)
    html_path, json_path = tmp_path / "a.html", tmp_path / "a.json"
    assert main(["attention", "The cat sat on the mat.", "--html", str(html_path), "--json", str(json_path)]) == 0
    written = json.loads(json_path.read_text())
    expected = llm.attention("The cat sat on the mat.")[0]
    assert written[0]["query_tokens"] == expected.query_tokens
    torch.testing.assert_close(torch.tensor(written[0]["layers"][3]), expected.layers[3])
    assert page_json(html_path.read_text())["kinds"][0]["query_tokens"] == expected.query_tokens


def test_the_cli_says_in_one_line_what_is_wrong(llm, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "load_llm", lambda args: llm)
    assert_one_line_error(capsys, ["attention", "text"], "--html FILE")
    assert_one_line_error(capsys, ["attention", "text", "--html", str(tmp_path / "no" / "a.html")], "existing folder")
    assert_one_line_error(capsys, ["attention", "  ", "--json", str(tmp_path / "a.json")], "empty")
    assert_one_line_error(capsys, ["attention", "word " * 600, "--json", str(tmp_path / "a.json")], "at most")


@pytest.mark.slow
def test_an_encoder_decoder_shows_encoder_decoder_and_cross_attention_of_its_own_output(tmp_path, capsys, browser,
                                                                                        page_errors):
    from leapllm.engine.seq2seq_lm import Seq2SeqLM
    from tests.model.seq2seq_reference import reference

    hf, folder = reference("opus-mt-en-de")
    lm = Seq2SeqLM(folder)
    source = "the house is wonderful"
    encoder, decoder, cross = lm.attention(source)
    output = lm.generate(source, num_beams=1)[0].token_ids
    assert [m.kind for m in (encoder, decoder, cross)] == ["encoder", "decoder", "cross"]
    assert len(cross.query_tokens) == len(output) + 1 and cross.key_tokens == encoder.query_tokens
    # The same probabilities as transformers' eager attention, teacher-forced on that output.
    ids = torch.tensor([lm.encode(source)])
    decoder_ids = torch.tensor([[hf.config.decoder_start_token_id, *output]])
    with torch.no_grad():
        ref = hf(input_ids=ids, decoder_input_ids=decoder_ids, output_attentions=True)
    for ours, theirs in ((encoder, ref.encoder_attentions), (decoder, ref.decoder_attentions),
                         (cross, ref.cross_attentions)):
        assert len(ours.layers) == len(theirs)
        for got, want in zip(ours.layers, theirs, strict=True):
            torch.testing.assert_close(got, want[0], atol=1e-5, rtol=0)
    # The CLI writes one page with the three kinds.
    out = tmp_path / "t.html"
    assert main(["attention", "--model", str(folder), source, "--target", "the house", "--html", str(out)]) == 0
    assert [k["kind"] for k in page_json(out.read_text())["kinds"]] == ["encoder", "decoder", "cross"]
    # In the page, the cross-attention view lists the target's tokens as queries beside the source's.
    page = open_page(browser, out.as_uri(), page_errors)
    page.get_by_role("button", name="cross").click()
    assert page.locator("#detail-title").inner_text() == "cross attention, layer 0, head 0"
    assert page.locator("#queries span").count() == len(lm.tokenizer.encode("the house")) + 1
    assert page.locator("#keys span").count() == len(encoder.key_tokens)
    assert page_errors == []


@pytest.mark.parametrize("family", ["distilbert", "albert"])
def test_an_encoder_folder_with_a_task_head_shows_its_self_attention(family, tmp_path):
    from leapllm.encoders.embedder import Embedder
    from tests.encoders.tiny_task_models import task_folder

    folder, hf, tokenizer = task_folder(family, "token-classification")
    text = "Angela Merkel visited Paris last week."
    (maps,) = Embedder(folder).attention(text)
    enc = tokenizer(text, return_tensors="pt")
    assert maps.query_tokens == tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    with torch.no_grad():
        expected = hf(**enc, output_attentions=True).attentions
    assert len(maps.layers) == len(expected)
    for got, want in zip(maps.layers, expected, strict=True):
        torch.testing.assert_close(got, want[0], atol=1e-5, rtol=0)
    out = tmp_path / "a.json"
    assert main(["attention", "--model", str(folder), text, "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["query_tokens"] == maps.query_tokens
