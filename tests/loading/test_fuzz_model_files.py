"""A seeded fuzz of damaged model files: a tiny GGUF and a tiny safetensors folder, truncated at many
offsets, with flipped bytes in the header, tensor descriptions and data, and patched counts, types
and shapes. Every variant must either fail with leapllm's own error (the CLI's one line and exit 2)
or load and give finite logits; never another exception, a hang, or unbounded memory. The variants
run in one child process under an address-space limit, each with a time limit."""

from __future__ import annotations

import json
import random
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ADDRESS_SPACE_LIMIT = 12 * 2**30  # bytes: a runaway allocation fails in the child, not the machine
SECONDS_PER_VARIANT = 20


def gguf_variants(data: bytes, rng: random.Random, info_start: int, data_start: int) -> list[tuple[str, bytes]]:
    """Damaged copies of a GGUF file's bytes, each with what was done to it. The metadata runs from
    byte 24 to info_start (mostly the vocabulary), the tensor descriptions (names, dimensions, types,
    offsets) from there to data_start, then the tensors."""
    regions = {"metadata head": (4, min(info_start, 4096)), "tensor descriptions": (info_start, data_start),
               "tensor data": (data_start, len(data))}
    out = []
    for cut in sorted(rng.sample(range(4, len(data)), 40)):
        out.append((f"truncated at {cut}", data[:cut]))
    for region, count in (("metadata head", 40), ("tensor descriptions", 60), ("tensor data", 20)):
        lo, hi = regions[region]
        for _ in range(count):
            b = bytearray(data)
            for pos in rng.sample(range(lo, hi), rng.randint(1, 4)):
                b[pos] ^= 1 << rng.randrange(8)
            out.append((f"{region}: bytes flipped", bytes(b)))
    extremes = [0, 1, 7, 2**31 - 1, 2**32 - 1, 2**63 - 1]
    for region, count in (("metadata head", 20), ("tensor descriptions", 40)):
        lo, hi = regions[region]
        for _ in range(count):  # counts, lengths, dimensions, types and offsets set to extremes
            b = bytearray(data)
            pos = rng.randrange(lo, hi - 8)
            fmt = rng.choice(["<I", "<Q"])
            struct.pack_into(fmt, b, pos, min(rng.choice(extremes), 2**32 - 1 if fmt == "<I" else 2**64 - 1))
            out.append((f"{region}: {fmt} at {pos} patched", bytes(b)))
    return out


def folder_variants(folder: Path, rng: random.Random) -> list[tuple[str, dict[str, bytes]]]:
    """Damaged copies of a safetensors folder: {file name: bytes} to overwrite, with what was done."""
    weights = (folder / "model.safetensors").read_bytes()
    config = json.loads((folder / "config.json").read_text())
    out = []
    for cut in sorted(rng.sample(range(1, len(weights)), 25)):
        out.append((f"safetensors truncated at {cut}", {"model.safetensors": weights[:cut]}))
    header_len = struct.unpack_from("<Q", weights)[0] + 8
    for _ in range(25):
        b = bytearray(weights)
        for pos in rng.sample(range(0, header_len), rng.randint(1, 3)):
            b[pos] = rng.randrange(256)
        out.append(("safetensors header bytes replaced", {"model.safetensors": bytes(b)}))
    keys = ["num_attention_heads", "num_key_value_heads", "num_hidden_layers", "hidden_size", "intermediate_size",
            "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "head_dim", "rope_scaling"]
    values = [0, -1, 2**40, 1e9, 0.5, float("nan"), "x", None, [], {"type": "dynamic"}, {"rope_type": "yarn"}]
    for _ in range(40):
        cfg = dict(config)
        cfg[rng.choice(keys)] = rng.choice(values)
        out.append(("config.json field patched", {"config.json": json.dumps(cfg).encode()}))
    return out


WORKER = """
import json, signal, sys, time, torch
from leapllm.errors import LeapLLMError
from leapllm.loading.loader import load_model

def alarm(*_):
    raise TimeoutError("took too long")

signal.signal(signal.SIGALRM, alarm)
results = []
for path in sys.argv[2:]:
    signal.alarm(int(sys.argv[1]))
    try:
        loaded = load_model(path, "float32", "cpu")
        with torch.inference_mode():
            logits = loaded.model(torch.tensor([[1, 2, 3]]))
        outcome = "finite logits" if bool(torch.isfinite(logits).all()) else "LOADED WITH NON-FINITE LOGITS"
    except LeapLLMError as exc:
        outcome = "refused" if "\\n" not in str(exc) else "REFUSED WITH A MULTI-LINE MESSAGE"
    except BaseException as exc:
        outcome = f"CRASHED: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.alarm(0)
    results.append(outcome)
print(json.dumps(results))
"""


def limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def run_variants(paths: list[Path]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", WORKER, str(SECONDS_PER_VARIANT), *map(str, paths)],
                          capture_output=True, text=True, preexec_fn=limit_address_space, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_damaged_ggufs_are_refused_or_load_finite(tmp_path, default_gguf_path):
    from tests.tiny_models import TINY_VOCAB, tiny_hf_state, write_tiny_gguf

    from gguf import GGUFReader

    path = write_tiny_gguf(tmp_path / "tiny.gguf", default_gguf_path, tiny_hf_state(TINY_VOCAB))
    data = path.read_bytes()
    info_start = data.find(b"token_embd.weight") - 8  # the first tensor description, from its name's length
    variants = gguf_variants(data, random.Random(0), info_start, GGUFReader(path).data_offset)
    paths = []
    for i, (_, blob) in enumerate(variants):
        paths.append(tmp_path / f"v{i}.gguf")
        paths[-1].write_bytes(blob)
    outcomes = run_variants(paths)
    bad = [(what, outcome) for (what, _), outcome in zip(variants, outcomes) if outcome.isupper() or ":" in outcome]
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    print(f"{len(variants)} damaged GGUFs: {counts}")
    assert not bad, "\n".join(f"{w}: {o}" for w, o in bad)
    assert counts.get("refused", 0) > len(variants) // 2  # the damage reaches what the loader reads


@pytest.mark.slow
def test_damaged_safetensors_folders_are_refused_or_load_finite(tmp_path, hf_tokenizer):
    import shutil

    from tests.tiny_models import write_tiny_hf_folder

    good = write_tiny_hf_folder(tmp_path / "good", hf_tokenizer)
    variants = folder_variants(good, random.Random(0))
    paths = []
    for i, (_, files) in enumerate(variants):
        folder = tmp_path / f"v{i}"
        shutil.copytree(good, folder)
        for name, blob in files.items():
            (folder / name).write_bytes(blob)
        paths.append(folder)
    outcomes = run_variants(paths)
    bad = [(what, outcome) for (what, _), outcome in zip(variants, outcomes) if outcome.isupper() or ":" in outcome]
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    print(f"{len(variants)} damaged safetensors folders: {counts}")
    assert not bad, "\n".join(f"{w}: {o}" for w, o in bad)
