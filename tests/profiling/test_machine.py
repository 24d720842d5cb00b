"""Machine limits: measured once with small sizes, cached under tmp_path, read back from the cache."""

from __future__ import annotations

import json

import pytest
import torch

from leapllm.errors import InvalidRequestError
from leapllm.kernels import cpu_kernels
from leapllm.profiling import machine as machine_mod
from leapllm.output_files import atomic_write, check_writable
from leapllm.profiling.machine import default_cache_path, load_machine, machine_limits, measure_machine

SMALL = dict(bandwidth_bytes=8 << 20, matmul_n=128, repeats=2)


def test_measurement_gives_positive_bandwidth_and_flops():
    limits = measure_machine("cpu", **SMALL)
    assert limits.bandwidth > 1e8  # any machine streams more than 100 MB/s
    int8 = {"int8"} if cpu_kernels() is not None else set()  # the kernels' tiles' ceiling, where they build
    assert set(limits.flops) == {"float32", "bfloat16"} | int8 and all(f > 1e7 for f in limits.flops.values())
    assert limits.balance("float32") == pytest.approx(limits.flops["float32"] / limits.bandwidth)
    assert limits.peak_flops("float16") == limits.flops["bfloat16"]  # not measured on CPU: bfloat16's


def test_the_int8_ceiling_is_the_tiles_instruction_on_every_thread_and_above_their_achieved_rate():
    if cpu_kernels() is None or not (cpu_kernels().avx2_compiled() or cpu_kernels().vnni_compiled()):
        pytest.skip("no SIMD tiles in this build")
    peak = machine_mod.measure_int8_ops(repeats=2, iterations=2_000_000)
    assert peak is not None and peak > 1e9


def test_a_cached_cpu_entry_without_the_int8_ceiling_is_measured_again(tmp_path):
    if cpu_kernels() is None:
        pytest.skip("the kernels do not build here")
    limits = measure_machine("cpu", **SMALL)
    limits.flops.pop("int8", None)
    path = machine_mod.save_machine(limits, tmp_path / "machine.json")
    assert load_machine("cpu", path) is None


def test_a_cached_int8_ceiling_from_the_flawed_loop_is_measured_again(tmp_path):
    """The first AVX2 peak loop let the compiler hoist its maddubs and timed the adds alone."""
    if cpu_kernels() is None:
        pytest.skip("the kernels do not build here")
    limits = measure_machine("cpu", **SMALL)
    path = machine_mod.save_machine(limits, tmp_path / "machine.json")
    assert load_machine("cpu", path) == limits
    stored = json.loads(path.read_text())
    stored[limits.key].pop("int8_method")  # as written before the method was recorded
    path.write_text(json.dumps(stored))
    assert load_machine("cpu", path) is None


def test_first_call_measures_and_caches_second_call_reads_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "machine.json"
    first = machine_limits("cpu", cache_path=path, **SMALL)
    assert not first.from_cache and path.is_file()
    stored = json.loads(path.read_text())
    assert list(stored) == [first.key] and "torch" in first.key and "threads" in first.key

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(machine_mod, "measure_machine", no_measuring)
    second = machine_limits("cpu", cache_path=path)
    assert second.from_cache and second == first
    with pytest.raises(AssertionError, match="measured again"):
        machine_limits("cpu", cache_path=path, remeasure=True)


def test_the_cache_is_keyed_by_thread_count(tmp_path):
    import torch

    path = tmp_path / "machine.json"
    machine_limits("cpu", cache_path=path, **SMALL)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if before > 1 else 2)
        assert load_machine("cpu", path) is None
    finally:
        torch.set_num_threads(before)
    assert load_machine("cpu", path) is not None


def test_default_cache_path_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "leapllm" / "machine.json"


def test_a_corrupt_cache_is_measured_again(tmp_path):
    path = tmp_path / "machine.json"
    path.write_text("{not json")
    assert not machine_limits("cpu", cache_path=path, **SMALL).from_cache
    assert machine_limits("cpu", cache_path=path).from_cache


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "out.json"
    atomic_write(target, "first")
    atomic_write(target, "second")
    assert target.read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_unwritable_outputs_are_invalid_requests(tmp_path):
    with pytest.raises(InvalidRequestError, match="does not exist"):
        check_writable(tmp_path / "missing" / "out.html")
    with pytest.raises(InvalidRequestError, match="is a folder"):
        check_writable(tmp_path)
    with pytest.raises(InvalidRequestError, match="cannot write"):
        atomic_write(tmp_path / "missing" / "out.json", "{}")


def test_bfloat16_is_measured_small_where_the_cpu_emulates_it(monkeypatch):
    """Emulated bfloat16 runs at about 1 GFLOP/s: a 2048^3 matmul took 18 s a call."""
    sizes = {}

    def fake_matmul_flops(device, dtype, n, repeats=5):
        sizes[str(dtype)] = n
        return 1e9

    monkeypatch.setattr(machine_mod, "measure_matmul_flops", fake_matmul_flops)
    monkeypatch.setattr(machine_mod, "measure_int8_ops", lambda repeats=5: None)
    measure_machine("cpu", bandwidth_bytes=8 << 20, matmul_n=2048, repeats=1)
    native = torch.cpu._is_avx512_bf16_supported()
    assert sizes == {"torch.float32": 2048, "torch.bfloat16": 2048 if native else 512}
