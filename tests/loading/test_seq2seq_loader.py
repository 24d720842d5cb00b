"""Loading encoder-decoder folders: errors, generation defaults, and Marian's SentencePiece tokenizer
against transformers' MarianTokenizer."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from leapllm.errors import ModelLoadError
from leapllm.loading.seq2seq_loader import MarianTokenizer, is_seq2seq_folder, load_seq2seq
from tests.model.seq2seq_reference import REAL, VOCAB, reference

CORPUS = ["The house is wonderful.", "We go home today, and the dog runs fast!", "A small cat sleeps in the sun.",
          "It was a very good day.", "Translate English to German: the tree is green."] * 20


def copy_folder(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(reference(name)[1], dst)
    return dst


def test_missing_config_is_one_clear_error(tmp_path):
    folder = copy_folder("t5-small", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json") as err:
        load_seq2seq(folder)
    assert "\n" not in str(err.value)


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    folder = copy_folder("bart-base", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "pegasus"}))
    with pytest.raises(ModelLoadError, match="'pegasus' is not a supported encoder-decoder.*marian") as err:
        load_seq2seq(folder)
    assert "\n" not in str(err.value)


def test_missing_tensor_and_missing_tokenizer_are_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_folder("opus-mt-en-de", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layers.1.fc2" not in k}, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match="missing tensor encoder.layers.1.ffn.down_proj"):
        load_seq2seq(folder)
    save_file(tensors, folder / "model.safetensors")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        load_seq2seq(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_seq2seq(folder)


def test_is_seq2seq_folder(tmp_path):
    assert is_seq2seq_folder(reference("mbart-large-cc25")[1])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_seq2seq_folder(tmp_path)
    assert not is_seq2seq_folder(tmp_path / "nowhere")


def test_generation_defaults_come_from_the_folder():
    bart = load_seq2seq(reference("bart-base")[1]).generation
    assert (bart.num_beams, bart.forced_bos_token_id, bart.forced_eos_token_id, bart.no_repeat_ngram_size,
            bart.early_stopping, bart.decoder_start_token_id) == (4, 0, 2, 3, True, 2)
    marian = load_seq2seq(reference("opus-mt-en-de")[1]).generation
    assert marian.bad_words_ids == [[VOCAB - 1]] and marian.renormalize_logits and marian.max_length == 512
    assert marian.decoder_start_token_id == marian.pad_token_id == VOCAB - 1
    t5 = load_seq2seq(reference("t5-small")[1]).generation
    assert t5.task_specific_params["summarization"]["prefix"] == "summarize: "
    assert t5.task_specific_params["translation_en_to_de"]["prefix"] == "translate English to German: "


def test_generation_keys_of_config_json_apply_without_generation_config(tmp_path):
    folder = copy_folder("bart-base", tmp_path)
    (folder / "generation_config.json").unlink()
    defaults = load_seq2seq(folder).generation  # bart-base's config.json also holds them
    assert (defaults.num_beams, defaults.no_repeat_ngram_size, defaults.forced_bos_token_id) == (4, 3, 0)


@pytest.fixture(scope="module")
def marian_folder(tmp_path_factory):
    """A Marian folder as the Hub ships it: source.spm, target.spm, vocab.json, no tokenizer.json."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("marian")
    for name, size in (("source.spm", 50), ("target.spm", 46)):
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=size,
                                       model_type="unigram", minloglevel=2)
        (folder / name).write_bytes(model.getvalue())
    pieces = []
    for name in ("source.spm", "target.spm"):
        sp = spm.SentencePieceProcessor(model_proto=(folder / name).read_bytes())
        pieces += [sp.IdToPiece(i) for i in range(3, sp.GetPieceSize())]
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in pieces[:-6]:  # a few pieces left out: they must come out as <unk>
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer_config.json").write_text(json.dumps({"source_lang": "en", "target_lang": "de"}))
    return folder


def test_marian_sentencepiece_tokenizer_matches_transformers(marian_folder):
    from transformers import MarianTokenizer as HFMarianTokenizer

    ours = MarianTokenizer(marian_folder)
    theirs = HFMarianTokenizer(str(marian_folder / "source.spm"), str(marian_folder / "target.spm"),
                               str(marian_folder / "vocab.json"))
    for text in ["The house is wonderful.", "A dog sleeps, qxz!", "", "  spaces  and\ttabs "]:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


def test_marian_folder_without_tokenizer_json_loads_with_sentencepiece(marian_folder, tmp_path):
    folder = copy_folder("opus-mt-en-de", tmp_path)
    (folder / "tokenizer.json").unlink()
    for name in ("source.spm", "target.spm", "vocab.json", "tokenizer_config.json"):
        shutil.copy(marian_folder / name, folder / name)
    vocab = json.loads((folder / "vocab.json").read_text())
    assert len(vocab) <= VOCAB
    loaded = load_seq2seq(folder)
    assert isinstance(loaded.tokenizer, MarianTokenizer)
    assert loaded.tokenizer.encode("The house.")[-1] == 0  # </s>
    (folder / "target.spm").unlink()
    with pytest.raises(ModelLoadError, match="target.spm is missing"):
        load_seq2seq(folder)


def test_real_config_values_are_kept_in_the_references():
    assert REAL["opus-mt-en-de"]["config"]["activation_function"] == "swish"
    assert REAL["flan-t5-small"]["config"]["feed_forward_proj"] == "gated-gelu"


@pytest.mark.parametrize("name", ["opus-mt-en-de", "flan-t5-small"])
def test_int8_puts_the_decoder_and_head_on_int8_weights_and_leaves_the_encoder_as_stored(name):
    import torch

    from leapllm.kernels import cpu_kernels
    from leapllm.model.quantized.int8 import Int8Linear

    if cpu_kernels() is None:
        pytest.skip("leapllm CPU kernels unavailable")
    _, folder = reference(name)
    exact, quantized = load_seq2seq(folder), load_seq2seq(folder, quantize="int8")
    decoder_linears = [m for m in quantized.model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert not decoder_linears and isinstance(quantized.model.lm_head, Int8Linear)
    assert quantized.model.lm_head.packed_linear is not None  # on leapllm's kernels
    assert not any(isinstance(m, Int8Linear) for m in quantized.model.encoder.modules())
    ids = torch.tensor([[5, 9, 14, 22, 3, 2]])
    start = exact.generation.decoder_start_token_id
    decoder_ids = torch.tensor([[start, 7, 11, 13]])
    with torch.inference_mode():
        a, b = exact.model(ids, None, decoder_ids), quantized.model(ids, None, decoder_ids)
    assert ((a - b).norm() / a.norm()).item() < 0.02
    with pytest.raises(ModelLoadError, match="support int8"):
        load_seq2seq(folder, quantize="int4")
