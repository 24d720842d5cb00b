"""`leapllm eval perplexity|agree`: the JSON report, and every bad input -> one error line, exit 2.

The commands run in-process on the session's model (load_llm patched), so only the tiny
reference of the vocabulary test is loaded from disk.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from leapllm.cli import common as cli_common
from leapllm.cli.main import main
from leapllm.evaluation import builtin_text
from tests.cli_helpers import assert_one_line_error
from tests.tiny_models import TINY_VOCAB, tiny_hf_state, write_tiny_gguf


@pytest.fixture
def session_model(monkeypatch, llm, default_gguf_path):
    """The default model, asked for by default or by path, is the session's: no second load."""
    real_load_llm = cli_common.load_llm

    def load_llm(args):
        return llm if args.model in (None, str(default_gguf_path)) else real_load_llm(args)

    monkeypatch.setattr(cli_common, "load_llm", load_llm)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text(builtin_text("python-docs-heldout")[:1000], encoding="utf-8")
    return path


def test_perplexity_of_a_text_file_writes_the_json_report(capsys, tmp_path, session_model, llm, text_file):
    out = tmp_path / "ppl.json"
    argv = ["eval", "perplexity", "--text", str(text_file), "--ctx", "32", "--max-tokens", "50", "--json", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("perplexity ") and "3 windows of 32 tokens, stride 16" in stdout
    report = json.loads(out.read_text())
    assert report["command"] == "eval perplexity"
    assert (report["model"], report["dtype"], report["device"]) == (str(llm.path), "float32", "cpu")
    assert report["text"] == str(text_file) and report["text_chars"] == 1000
    assert report["text_sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
    assert (report["text_tokens"], report["max_tokens"], report["bos"]) == (50, 50, False)
    assert (report["tokens"], report["windows"], report["ctx"], report["stride"]) == (49, 3, 32, 16)
    assert 1 < report["perplexity"] < 1000 and report["mean_nll"] == pytest.approx(math.log(report["perplexity"]))
    assert report["seconds"] > 0 and report["tokens_per_s"] > 0 and report["batch_size"] >= 1


def test_agree_of_the_model_with_itself_on_a_builtin_text(capsys, tmp_path, session_model, default_gguf_path):
    out = tmp_path / "agree.json"
    argv = ["eval", "agree", "--reference", str(default_gguf_path), "--text", "builtin:python-docs-heldout",
            "--ctx", "32", "--max-tokens", "40", "--json", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("top-1 agreement 1.0000")
    report = json.loads(out.read_text())
    assert report["command"] == "eval agree" and report["text"] == "builtin:python-docs-heldout"
    assert (report["agreement"], report["top5_overlap"], report["tokens"], report["windows"]) == (1.0, 1.0, 39, 2)
    assert abs(report["mean_kl"]) < 1e-6 and report["reference_dtype"] == "float32"
    assert report["model_perplexity"] == pytest.approx(report["reference_perplexity"])
    assert report["python"] and len(report["text_sha256"]) == 64


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n\t\n")
    (tmp_path / "binary.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" * 10)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "one-token.txt").write_text("Hello")
    return tmp_path


@pytest.mark.parametrize("text,extra,pattern", [
    ("missing.txt", [], "does not exist"),
    ("empty.txt", [], "is empty"),
    ("blank.txt", [], "is empty"),
    ("binary.bin", [], "looks binary"),
    ("latin1.txt", [], "is not UTF-8 text"),
    (".", [], "is a folder"),
    ("builtin:shakespeare", [], "unknown built-in text 'shakespeare'"),
    ("docs", ["--ctx", "1"], "--ctx must be at least 2"),
    ("docs", ["--ctx", "9000"], "larger than the model's context of 8192"),
    ("docs", ["--ctx", "128", "--stride", "0"], "--stride must be between 1 and --ctx (128), got 0"),
    ("docs", ["--ctx", "128", "--stride", "129"], "--stride must be between 1 and --ctx (128), got 129"),
    ("docs", ["--max-tokens", "1"], "--max-tokens must be at least 2"),
    ("docs", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("docs", ["--json", "no-such-folder/out.json"], "does not exist"),
    ("one-token.txt", [], "1 token(s) long; at least 2 are needed"),
])
@pytest.mark.parametrize("command", ["perplexity", "agree"])
def test_bad_inputs_give_one_error_line(capsys, bad_files, session_model, default_gguf_path, command, text,
                                        extra, pattern):
    if text == "docs":
        text = "builtin:python-docs-heldout"
    elif not text.startswith("builtin:"):
        text = str(bad_files / text)
    extra = [str(bad_files / a) if a.endswith(".json") else a for a in extra]
    argv = ["eval", command, "--text", text, *extra]
    if command == "agree":
        argv += ["--reference", str(default_gguf_path)]
    assert_one_line_error(capsys, argv, pattern)


def test_agree_refuses_a_reference_with_another_vocabulary(capsys, tmp_path, session_model, default_gguf_path):
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", default_gguf_path, tiny_hf_state(TINY_VOCAB))
    argv = ["eval", "agree", "--reference", str(tiny), "--text", "builtin:python-docs-heldout", "--max-tokens", "50"]
    assert_one_line_error(capsys, argv, f"vocabulary mismatch: the model has 49152 tokens, the reference {TINY_VOCAB}")
