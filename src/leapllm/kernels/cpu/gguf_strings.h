// A GGUF metadata array of strings (a vocabulary's tokens or merges) read into Python strings, and
// a byte-level BPE's merges split into pairs.
//
// Why in C++: a vocabulary holds ~100,000 strings, each a uint64 length and its UTF-8 bytes, and
// the offset of each depends on the length before it. Python's loop over them took most of reading
// the default model's header, and splitting the merges a fifth of building its tokenizer
// (benchmarks/README.md); here the loops are only the strings' creation.
#pragma once

#include <Python.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common.h"

// `count` strings from byte `offset` of `data` (any buffer: the memory-mapped file): (list of str,
// the offset after the last). Raises ValueError naming the byte where a string runs past the end of
// the buffer or is not UTF-8, in the words of the loader's errors.
inline pybind11::tuple read_gguf_strings(pybind11::buffer data, int64_t offset, int64_t count) {
  const pybind11::buffer_info info = data.request();
  TORCH_CHECK(info.itemsize == 1 && (info.ndim == 1 || info.size == 0), "data: a buffer of bytes");
  const auto* base = static_cast<const uint8_t*>(info.ptr);
  const uint64_t size = (uint64_t)info.size;
  TORCH_CHECK(offset >= 0 && (uint64_t)offset <= size && count >= 0, "offset or count out of range");
  // Every string takes at least its 8-byte length: a damaged count fails here, before any allocation.
  const auto past_end = [](uint64_t at) {
    return pybind11::value_error("truncated or corrupt GGUF file (a field runs past the end at byte " +
                                 std::to_string(at) + ")");
  };
  if ((uint64_t)count > (size - (uint64_t)offset) / 8) throw past_end(size);
  pybind11::list out(count);
  uint64_t pos = (uint64_t)offset;
  for (int64_t i = 0; i < count; ++i) {
    uint64_t n;
    if (size - pos < 8) throw past_end(pos);
    std::memcpy(&n, base + pos, 8);
    if (size - pos - 8 < n) throw past_end(pos + 8);
    PyObject* s = PyUnicode_DecodeUTF8(reinterpret_cast<const char*>(base + pos + 8), (Py_ssize_t)n, "strict");
    if (s == nullptr) {
      PyErr_Clear();
      throw pybind11::value_error("corrupt GGUF file (a string that is not UTF-8 at byte " + std::to_string(pos + 8) + ")");
    }
    PyList_SET_ITEM(out.ptr(), i, s);  // steals the reference
    pos += 8 + n;
  }
  return pybind11::make_tuple(out, (int64_t)pos);
}

// A byte-level BPE vocabulary's merges ("left right", ~50,000 of them) as (left, right) pairs, split
// at the first space after position 0 as llama.cpp splits them. Raises ValueError naming the index
// of the first entry that is not a string or has no such space.
inline pybind11::list split_merges(pybind11::list merges) {
  const Py_ssize_t count = PyList_GET_SIZE(merges.ptr());
  pybind11::list out(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* merge = PyList_GET_ITEM(merges.ptr(), i);
    const Py_ssize_t n = PyUnicode_Check(merge) ? PyUnicode_GET_LENGTH(merge) : 0;
    const Py_ssize_t cut = n > 1 ? PyUnicode_FindChar(merge, ' ', 1, n, 1) : -1;
    if (cut < 0) {
      PyErr_Clear();  // (FindChar's -2 would have set an error)
      throw pybind11::value_error(std::to_string(i));
    }
    PyObject* pair = PyTuple_New(2);
    PyObject* left = PyUnicode_Substring(merge, 0, cut);
    PyObject* right = PyUnicode_Substring(merge, cut + 1, n);
    if (pair == nullptr || left == nullptr || right == nullptr) {
      Py_XDECREF(pair);
      Py_XDECREF(left);
      Py_XDECREF(right);
      throw pybind11::error_already_set();
    }
    PyTuple_SET_ITEM(pair, 0, left);
    PyTuple_SET_ITEM(pair, 1, right);
    PyList_SET_ITEM(out.ptr(), i, pair);
  }
  return out;
}
