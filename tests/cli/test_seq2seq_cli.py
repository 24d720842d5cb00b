"""`leapllm translate` and `leapllm summarize` on tiny random-weight folders (tests/model/seq2seq_reference.py)."""

from __future__ import annotations

import io

import torch

from leapllm.cli.main import main
from tests.cli_helpers import assert_one_line_error
from tests.model.seq2seq_reference import REAL, reference, source_batch

TEXTS = ["the house is wonderful", "a big red tree"]


def run(monkeypatch, capsys, argv, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    return code, capsys.readouterr()


def test_translate_t5_prints_what_transformers_generates(monkeypatch, capsys):
    from transformers import PreTrainedTokenizerFast

    hf, folder = reference("t5-small")
    code, out = run(monkeypatch, capsys, ["translate", "--model", str(folder), "--target-lang", "de",
                                          "--num-beams", "2", "--max-new-tokens", "8", *TEXTS])
    assert code == 0, out.err
    prefix = REAL["t5-small"]["config"]["task_specific_params"]["translation_en_to_de"]["prefix"]
    ids, mask = source_batch(folder, [prefix + t for t in TEXTS], 0)
    with torch.no_grad():
        rows = hf.generate(input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=8, early_stopping=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert out.out.splitlines() == [tok.decode(r, skip_special_tokens=True) for r in rows]


def test_translate_reads_lines_from_stdin(monkeypatch, capsys):
    _, folder = reference("opus-mt-en-de")
    code, out = run(monkeypatch, capsys, ["translate", "--model", str(folder), "--max-new-tokens", "4",
                                          "--num-beams", "1", "--stats"], stdin="a cat\n\nthe sun\n")
    assert code == 0, out.err
    assert len(out.out.splitlines()) == 2
    assert "8 generated in" in out.err and "tok/s" in out.err


def test_summarize_reads_stdin(monkeypatch, capsys):
    _, folder = reference("bart-base")
    code, out = run(monkeypatch, capsys, ["summarize", "--model", str(folder), "--max-new-tokens", "5"],
                    stdin="the house is wonderful. " * 20)
    assert code == 0, out.err
    assert len(out.out.splitlines()) == 1


def test_bad_input_exits_2_with_one_line(monkeypatch, capsys, tmp_path):
    _, folder = reference("t5-small")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert_one_line_error(capsys, ["translate", "--model", str(folder), "--num-beams", "0", "x"], "--num-beams")
    assert_one_line_error(capsys, ["translate", "--model", str(tmp_path), "x"], "no config.json")
    assert_one_line_error(capsys, ["translate", "--model", str(folder), "--target-lang", "xx", "x"],
                          "translation task")
    assert_one_line_error(capsys, ["translate", "--model", str(folder)], "no text to translate")
    assert_one_line_error(capsys, ["summarize", "--model", str(folder)], "no text to summarize")


def test_translate_int8_runs_the_decoder_on_int8_weights(monkeypatch, capsys):
    from leapllm.kernels import cpu_kernels

    if cpu_kernels() is None:
        import pytest

        pytest.skip("leapllm CPU kernels unavailable")
    _, folder = reference("opus-mt-en-de")
    code, out = run(monkeypatch, capsys, ["translate", "--model", str(folder), "--int8", "--max-new-tokens", "4",
                                          "--num-beams", "1", *TEXTS])
    assert code == 0, out.err
    assert len(out.out.splitlines()) == len(TEXTS)


def test_decoder_commands_name_the_commands_that_take_an_encoder_decoder(capsys):
    _, folder = reference("t5-small")
    for argv in (["generate", "--model", str(folder), "hello"], ["info", "--model", str(folder)],
                 ["eval", "perplexity", "--model", str(folder), "--text", "builtin:python-docs-heldout"]):
        assert_one_line_error(capsys, argv, "`leapllm translate`")
