"""Evaluation texts: built-in real prose the project did not write, or a plain UTF-8 file.

`--text builtin:NAME` picks a built-in text; anything else is a file path.

The built-in texts are the docstrings of Python standard-library modules, so they are on every
machine, offline, and were written by the CPython developers, not by us:

- `builtin:python-docs` (calibration: for tuning quantization, pruning, distillation, ...):
  argparse, collections, dataclasses, enum, functools, json, json.decoder, json.encoder, logging,
  pathlib, re, string, textwrap, threading, typing.
- `builtin:python-docs-heldout` (disjoint modules, for evaluations that must not see the
  calibration text): calendar, contextlib, csv, difflib, fractions, heapq, ipaddress, pprint, queue,
  random, shlex, statistics, tempfile, urllib.parse, zipfile.

How a text is built, deterministically, module by module in the order above:

1. the module's own docstring;
2. then, sorted by name, each public function and class (name not starting with "_") that is
   *defined in that module* (its `__module__` is the module's name, so re-exports are skipped
   and the two texts never share a docstring): its own docstring;
3. for a class, right after it, the own docstrings of the public methods and properties written
   in its body (`vars(cls)`), sorted by name. Inherited docstrings are never used.

Docstrings are cleaned with `inspect.cleandoc` (common indentation removed), empty ones are
skipped, a docstring already in the text is not repeated, and the pieces are joined with one blank
line. The text depends on the Python version (docstrings change between releases), so compare
figures measured with the same Python minor version; `text_sha256` in the CLI's JSON says whether
two runs saw the same text.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from pathlib import Path
from types import MappingProxyType

from leapllm.errors import InvalidRequestError

BUILTIN_PREFIX = "builtin:"

# Name -> the standard-library modules whose docstrings make up the text (in this order).
BUILTIN_TEXTS = MappingProxyType({
    "python-docs": (
        "argparse", "collections", "dataclasses", "enum", "functools", "json", "json.decoder",
        "json.encoder", "logging", "pathlib", "re", "string", "textwrap", "threading", "typing",
    ),
    "python-docs-heldout": (
        "calendar", "contextlib", "csv", "difflib", "fractions", "heapq", "ipaddress", "pprint", "queue",
        "random", "shlex", "statistics", "tempfile", "urllib.parse", "zipfile",
    ),
})


def own_docstring(obj) -> str:
    """obj's own docstring, cleaned; "" when it has none (never one inherited from a base class)."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def module_docstrings(module_name: str) -> list[str]:
    """The docstrings of one module, in the order the module docstring describes."""
    module = importlib.import_module(module_name)
    pieces = [own_docstring(module)]
    with warnings.catch_warnings():  # reading e.g. typing.re warns that it is deprecated: not our concern
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in sorted(vars(module)):
            pieces.extend(object_docstrings(module_name, name, vars(module)[name]))
    return pieces


def object_docstrings(module_name: str, name: str, obj) -> list[str]:
    """The docstrings of one public function or class defined in the module, then its methods'."""
    if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
        return []
    if getattr(obj, "__module__", None) != module_name:  # re-exported from another module
        return []
    pieces = [own_docstring(obj)]
    if inspect.isclass(obj):
        for method_name in sorted(vars(obj)):
            method = vars(obj)[method_name]
            if method_name.startswith("_"):
                continue
            if isinstance(method, (staticmethod, classmethod)):
                method = method.__func__
            if inspect.isroutine(method) or isinstance(method, property):
                pieces.append(own_docstring(method))
    return pieces


def builtin_text(name: str) -> str:
    """The built-in text `name` (a key of BUILTIN_TEXTS)."""
    if name not in BUILTIN_TEXTS:
        raise InvalidRequestError(f"unknown built-in text {name!r}; choose from: "
                                  + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_TEXTS))
    seen: set[str] = set()
    pieces = []
    for module_name in BUILTIN_TEXTS[name]:
        for piece in module_docstrings(module_name):
            if piece and piece not in seen:
                seen.add(piece)
                pieces.append(piece)
    return "\n\n".join(pieces) + "\n"


def read_text_file(path: str | Path) -> str:
    """A plain UTF-8 text file (a leading byte-order mark is dropped); clear errors for missing,
    unreadable, binary or empty files."""
    path = Path(path)
    if not path.exists():
        raise InvalidRequestError(f"text file {str(path)!r} does not exist")
    if path.is_dir():
        raise InvalidRequestError(f"text file {str(path)!r} is a folder")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read text file {str(path)!r}: {exc.strerror or exc}") from None
    # NUL bytes never occur in text but are everywhere in binaries (and valid UTF-8, so check them first).
    if b"\x00" in data:
        raise InvalidRequestError(f"text file {str(path)!r} looks binary (it contains NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"text file {str(path)!r} is not UTF-8 text "
                                  f"(invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise InvalidRequestError(f"text file {str(path)!r} is empty")
    return text


def load_text(spec: str) -> str:
    """`builtin:NAME` -> the built-in text; anything else -> the contents of that file."""
    if spec.startswith(BUILTIN_PREFIX):
        return builtin_text(spec[len(BUILTIN_PREFIX):])
    return read_text_file(spec)
