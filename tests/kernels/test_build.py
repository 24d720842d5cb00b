"""Building the kernels: `python -m leapllm.kernels` fails where a C++ compiler could have built them
and did not, and rebuilds when any of the C++ files changes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from leapllm import kernels


@pytest.fixture
def build(monkeypatch):
    """Stands in for PyTorch's builder: `build(ext)` or `build(error=...)` sets what it gives."""
    monkeypatch.delenv(kernels.DISABLE_VARIABLE, raising=False)
    monkeypatch.setattr(kernels, "_failure", [])

    def set_result(ext=None, error=None):
        def fake_build():
            if error is not None:
                raise error
            return ext
        monkeypatch.setattr(kernels, "_build", fake_build)

    return set_result


def test_main_fails_when_a_compiler_is_there_but_the_build_fails(build, monkeypatch, capsys):
    build(error=RuntimeError("Error building extension 'leapllm_cpu_kernels':\nbindings.cpp:1: error: boom"))
    monkeypatch.setattr(kernels, "find_compiler", lambda: "/usr/bin/c++")
    assert kernels.main() == 1
    err = capsys.readouterr().err
    assert "failed to build with /usr/bin/c++" in err and "bindings.cpp:1: error: boom" in err


def test_main_succeeds_without_a_compiler_and_says_so_in_one_line(build, monkeypatch, capsys):
    build(error=RuntimeError("Error building extension: c++: not found"))
    monkeypatch.setattr(kernels, "find_compiler", lambda: None)
    assert kernels.main() == 0
    err = capsys.readouterr().err
    assert "no C++ compiler" in err and len(err.strip().splitlines()) == 1


def test_main_succeeds_when_disabled_and_when_built(build, monkeypatch, capsys):
    build(error=RuntimeError("never built"))
    monkeypatch.setattr(kernels, "find_compiler", lambda: "/usr/bin/c++")
    monkeypatch.setenv(kernels.DISABLE_VARIABLE, "0")
    assert kernels.main() == 0
    assert f"{kernels.DISABLE_VARIABLE}=0" in capsys.readouterr().err
    monkeypatch.delenv(kernels.DISABLE_VARIABLE)
    build(ext=SimpleNamespace(vnni_compiled=lambda: False, avx2_compiled=lambda: True))
    assert kernels.main() == 0
    assert capsys.readouterr().out.strip() == "leapllm CPU kernels built (AVX2 tiles)"


def test_the_compiler_looked_for_first_is_the_one_pytorch_runs(monkeypatch):
    monkeypatch.setenv("CXX", "leapllm-no-such-compiler")
    assert kernels.find_compiler() in (None, shutil.which("c++"), shutil.which("g++"), shutil.which("clang++"))
    monkeypatch.setenv("CXX", "sh")  # any program on PATH
    assert kernels.find_compiler() == shutil.which("sh")


def test_every_header_is_compiled_and_hashed():
    """bindings.cpp includes every header of the folder (so the hash of the folder's files is the
    hash of what is compiled), and the hash changes with any of them."""
    included, todo = set(), ["bindings.cpp"]
    while todo:
        text = (kernels.SOURCE_DIR / todo.pop()).read_text()
        for name in re.findall(r'^#include "([^"]+)"', text, flags=re.MULTILINE):
            if name not in included:
                included.add(name)
                todo.append(name)
    assert included == {p.name for p in kernels.SOURCE_DIR.glob("*.h")}
    assert {p.name for p in kernels.source_files()} == included | {"bindings.cpp"}


def test_a_changed_header_changes_the_source_hash(tmp_path, monkeypatch):
    copy = tmp_path / "cpu"
    shutil.copytree(kernels.SOURCE_DIR, copy)
    monkeypatch.setattr(kernels, "SOURCE_DIR", copy)
    before = kernels.source_hash()
    assert before == kernels.source_hash()
    header = copy / "attention.h"
    header.write_text(header.read_text() + "\n")
    assert kernels.source_hash() != before


def test_the_build_is_named_by_its_sources_and_flags_so_installs_never_share_a_folder(tmp_path, monkeypatch):
    flags = ["-O3", "-march=native"]
    name = kernels.build_name(flags)
    assert re.fullmatch(r"leapllm_cpu_kernels_[0-9a-f]{12}", name) and kernels.build_name(flags) == name
    assert kernels.build_name(flags + ["-DX"]) != name
    copy = tmp_path / "cpu"  # another checkout, one header different
    shutil.copytree(kernels.SOURCE_DIR, copy)
    (copy / "attention.h").write_text((copy / "attention.h").read_text() + "\n")
    monkeypatch.setattr(kernels, "SOURCE_DIR", copy)
    assert kernels.build_name(flags) != name


def test_a_failed_build_is_not_tried_again_in_the_same_process(build, monkeypatch):
    calls = []

    def failing_build():
        calls.append(1)
        raise RuntimeError("Error building extension: boom")

    monkeypatch.setattr(kernels, "_build", failing_build)
    assert kernels.cpu_kernels() is None and kernels.cpu_kernels() is None
    assert len(calls) == 1 and kernels.why_unavailable() == "RuntimeError: Error building extension: boom"


def test_a_finished_build_is_imported_without_pytorchs_builder():
    """Once built, a start imports the library from the folder the builder was given, without
    importing the builder (its import alone takes longer than loading the default model)."""
    if kernels.cpu_kernels() is None:
        pytest.skip(f"kernels unavailable: {kernels.why_unavailable()}")
    code = ("import sys; from leapllm.kernels import cpu_kernels; ext = cpu_kernels(); "
            "print(ext.__file__); print('torch.utils.cpp_extension' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [kernels.cpu_kernels().__file__, "False"]


def test_no_finished_build_is_imported_while_one_is_under_way_or_where_it_does_not_import(tmp_path):
    name = "leapllm_cpu_kernels_000000000000"
    assert kernels.import_finished_build(name, tmp_path) is None  # not built
    library = tmp_path / f"{name}.so"
    library.write_bytes(b"not a shared library")
    assert kernels.import_finished_build(name, tmp_path) is None  # the builder then rebuilds or says why
    if kernels.cpu_kernels() is None:
        pytest.skip(f"kernels unavailable: {kernels.why_unavailable()}")
    built = Path(kernels.cpu_kernels().__file__)
    shutil.copy(built, tmp_path / f"{built.stem}.so")
    assert kernels.import_finished_build(built.stem, tmp_path).vnni_compiled() == kernels.cpu_kernels().vnni_compiled()
    (tmp_path / "lock").touch()  # PyTorch's builder holds it while it builds
    assert kernels.import_finished_build(built.stem, tmp_path) is None


def test_the_build_folder_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert kernels.build_folder("leapllm_cpu_kernels_x") == tmp_path / "leapllm_cpu_kernels_x"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    folder = kernels.build_folder("leapllm_cpu_kernels_x")
    assert folder.name == "leapllm_cpu_kernels_x" and folder.parent.name.startswith(f"py{sys.version_info.major}")
