"""`leapllm distill`: the student learns from the teacher, checkpoints resume to the very same
weights, mismatched vocabularies and bad settings are clear errors, and the CLI writes a folder."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from leapllm import LLM
from leapllm.cli.main import main
from leapllm.compression import distill as distill_module
from leapllm.compression.distill import (
    distill,
    distillation_loss,
    learning_rate,
    student_from_teacher_layers,
)
from leapllm.compression.prune import prune_model
from leapllm.config import DistillSettings
from leapllm.engine.sampling import SamplingParams
from leapllm.errors import InvalidRequestError
from tests.cli_helpers import assert_one_line_error
from tests.compression.test_prune import (
    CALIBRATION_TEXT,
    TINY_CONFIG,
    calibration_ids,
    random_tiny_model,
)
from tests.tiny_models import (
    TINY_VOCAB,
    tiny_hf_state,
    write_tiny_gguf,
    write_tiny_hf_folder,
)

SETTINGS = DistillSettings(steps=6, seq_len=32, batch_size=2, lr=1e-3, temperature=2.0, alpha=0.5)
TEXT = calibration_ids(2048, seed=5)


def confident_tiny_model():
    """A random tiny model with a larger head, so its next-token distributions are far from uniform."""
    model = random_tiny_model(seed=0)
    model.lm_head.weight.mul_(8)
    return model


def teacher_and_pruned_student():
    teacher, student = confident_tiny_model(), confident_tiny_model()
    prune_model(student, "ffn", 0.5, calibration_ids(), multiple_of=32)
    return teacher, student


def kl_to_teacher(teacher, student, tokens) -> float:
    with torch.inference_mode():
        t, s = torch.log_softmax(teacher(tokens), -1), torch.log_softmax(student(tokens), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_the_loss_is_kl_on_softened_logits_plus_cross_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    tokens = torch.randint(0, 11, (2, 5))
    total, soft, hard = distillation_loss(student, teacher, tokens, temperature=2.0, alpha=0.25)
    p_t, log_p_s = torch.softmax(teacher / 2, -1), torch.log_softmax(student / 2, -1)
    expected_soft = 4 * (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    expected_hard = torch.nn.functional.cross_entropy(student[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(soft, expected_soft)
    torch.testing.assert_close(hard, expected_hard)
    torch.testing.assert_close(total, 0.25 * expected_soft + 0.75 * expected_hard)
    same, _, _ = distillation_loss(teacher, teacher, tokens, temperature=3.0, alpha=1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_learning_rate_warms_up_then_decays():
    settings = DistillSettings(steps=100, lr=1e-3, warmup_fraction=0.1)
    rates = [learning_rate(step, settings) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:])) and rates[-1] >= 1e-4


def test_distillation_brings_the_pruned_student_closer_to_its_teacher():
    teacher, student = teacher_and_pruned_student()
    held_out = calibration_ids(64, seed=9).view(2, 32)
    before = kl_to_teacher(teacher, student, held_out)
    result = distill(teacher, student, TEXT, replace_settings(steps=12, alpha=1.0), progress=False)
    after = kl_to_teacher(teacher, student, held_out)
    assert after < 0.8 * before, (before, after)
    assert result.losses[-1] < result.losses[0] and len(result.losses) == 12
    assert not any(p.requires_grad for p in student.parameters())  # back to inference, like a loaded model
    # The embedding (tied to the head) stays frozen by default.
    assert torch.equal(student.embed_tokens.weight, teacher.embed_tokens.weight)


def replace_settings(**changes) -> DistillSettings:
    from dataclasses import replace

    return replace(SETTINGS, **changes)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    teacher, straight = teacher_and_pruned_student()
    distill(teacher, straight, TEXT, SETTINGS, progress=False)

    _, interrupted = teacher_and_pruned_student()
    save = distill_module.save_checkpoint

    def save_then_interrupt(*args, **kwargs):  # the process dies right after the first checkpoint
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_module, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, interrupted, TEXT, SETTINGS, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2,
                progress=False)
    monkeypatch.setattr(distill_module, "save_checkpoint", save)
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 2

    _, resumed = teacher_and_pruned_student()  # a fresh process: the student as loaded, then the checkpoint
    result = distill(teacher, resumed, TEXT, SETTINGS, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2,
                     resume=True, progress=False)
    assert result.resumed_from == 2 and len(result.losses) == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resuming_with_other_settings_or_without_a_checkpoint_is_an_error(tmp_path):
    teacher, student = teacher_and_pruned_student()
    with pytest.raises(InvalidRequestError, match="holds no checkpoint"):
        distill(teacher, student, TEXT, SETTINGS, checkpoint_dir=tmp_path / "none", resume=True, progress=False)
    distill(teacher, student, TEXT, replace_settings(steps=2), checkpoint_dir=tmp_path / "ckpt", progress=False)
    _, student = teacher_and_pruned_student()
    with pytest.raises(InvalidRequestError, match="different settings .*lr"):
        distill(teacher, student, TEXT, replace_settings(steps=2, lr=1e-4), checkpoint_dir=tmp_path / "ckpt",
                resume=True, progress=False)


def test_mismatched_vocabularies_and_bad_settings_are_errors():
    from dataclasses import replace

    teacher = random_tiny_model()
    other = random_tiny_model(config=replace(TINY_CONFIG, vocab_size=100))
    with pytest.raises(InvalidRequestError, match="vocabulary mismatch"):
        distill(teacher, other, TEXT, SETTINGS, progress=False)
    for bad, message in [({"temperature": 0.0}, "temperature"), ({"alpha": 1.5}, "alpha"), ({"steps": 0}, "steps"),
                         ({"seq_len": 4096}, "fewer than one window")]:
        with pytest.raises(InvalidRequestError, match=message):
            distill(teacher, random_tiny_model(), TEXT, replace_settings(**bad), progress=False)


def test_a_shallower_student_starts_from_evenly_spread_teacher_layers():
    from dataclasses import replace

    teacher = random_tiny_model(config=replace(TINY_CONFIG, num_layers=5))
    student = student_from_teacher_layers(teacher, 3)
    assert student.config.num_layers == 3
    for new, old in zip(range(3), (0, 2, 4)):
        assert torch.equal(student.layers[new].mlp.down_proj.weight, teacher.layers[old].mlp.down_proj.weight)
    with pytest.raises(InvalidRequestError, match="choose 1 to 4"):
        student_from_teacher_layers(teacher, 5)


# ---------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, default_gguf_path):
    root = tmp_path_factory.mktemp("distill")
    teacher = write_tiny_gguf(root / "tiny.gguf", default_gguf_path, tiny_hf_state(TINY_VOCAB))
    text = root / "text.txt"
    text.write_text(CALIBRATION_TEXT, encoding="utf-8")
    student = root / "ffn"
    assert main(["prune", "--model", str(teacher), "--method", "ffn", "--sparsity", "0.5", "--multiple-of", "32",
                 "--calib", str(text), "-o", str(student)]) == 0
    return teacher, student, text


def test_distill_command_writes_a_folder_that_loads_and_records_its_history(tiny_files, tmp_path):
    teacher, student, text = tiny_files
    out = tmp_path / "distilled"
    assert main(["distill", "--teacher", str(teacher), "--student", str(student), "--text", str(text),
                 "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--device", "cpu", "-o", str(out)]) == 0
    llm = LLM(out, dtype="float32", device="cpu")
    history = llm.metadata["history"]
    assert [h["method"] for h in history] == ["ffn", "distill"]
    assert history[-1]["steps"] == 3 and history[-1]["teacher"] == "tiny.gguf" and history[-1]["tokens_seen"] == 192
    assert llm.config.intermediate_size == 64
    assert not (tmp_path / "distilled.checkpoints").exists()  # removed once the folder is written
    assert len(llm.generate(["Hi"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0].token_ids) == 3


def test_distill_command_with_a_shallower_student(tiny_files, tmp_path):
    teacher, _, text = tiny_files
    out = tmp_path / "one-layer"
    assert main(["distill", "--teacher", str(teacher), "--student", "config:layers=1", "--text", str(text),
                 "--steps", "2", "--seq-len", "32", "--batch-size", "1", "-o", str(out)]) == 0
    assert LLM(out, dtype="float32", device="cpu").config.num_layers == 1


def test_bad_distill_commands_are_one_line_errors(capsys, tiny_files, tmp_path, hf_tokenizer):
    teacher, student, text = tiny_files
    base = ["distill", "--teacher", str(teacher), "--text", str(text), "--seq-len", "32", "-o", str(tmp_path / "out")]
    assert_one_line_error(capsys, base + ["--student", str(student), "--temperature", "0"], "temperature")
    assert_one_line_error(capsys, base + ["--student", str(student), "--alpha", "2"], "alpha")
    assert_one_line_error(capsys, base + ["--student", str(student), "--resume"], "no checkpoint folder")
    assert_one_line_error(capsys, base + ["--student", "config:depth=3"], "config:layers=N")
    assert_one_line_error(capsys, base + ["--student", str(tmp_path / "missing")], "no such file")
    assert_one_line_error(capsys, base[:4] + [str(tmp_path / "missing.txt")] + base[5:] + ["--student", str(student)],
                          "does not exist")
    wide_vocab = write_tiny_hf_folder(tmp_path / "hf", hf_tokenizer)  # the real 49152-token vocabulary
    assert_one_line_error(capsys, base + ["--student", str(wide_vocab)], "vocabulary mismatch")
    quantized = tmp_path / "int8"
    assert main(["quantize", "--model", str(student), "--method", "int8", "-o", str(quantized)]) == 0
    assert_one_line_error(capsys, base + ["--student", str(quantized)], "quantized")
    assert not (tmp_path / "out").exists()
