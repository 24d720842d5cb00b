// leapllm's CPU kernels: int4 / int8 weight matmuls on int8-quantized activations, and a fused
// batch-1 decode step.
//
// Why: a batch-1 decode step reads every weight once, so it is bound by memory bandwidth, and for a
// small model the many small PyTorch ops of each layer cost as much as its matmuls. Here the
// activations are quantized to int8 per block of 32 values (a scale each, as llama.cpp's Q8 blocks),
// so 4-bit or 8-bit weights times activations are integer dot-product instructions, and a whole
// Llama block runs in one call within one OpenMP region.
//
// The parts, one header each, all compiled as this one translation unit (so the compiler sees every
// call, and inlines across the parts as if they were one file):
//   common.h          instruction-set switches, the packed layout's sizes, activation quantization
//   tiles_portable.h  one tile of 16 weight rows against the activations, on any CPU (the reference)
//   tiles_avx2.h      the same tile with AVX2 (CPUs without AVX-512 VNNI)
//   tiles_vnni.h      the same tile with AVX-512 VNNI
//   super_blocks.h    GGUF K-quant super-blocks near the file's size, expanded a tile at a time
//   gguf_blocks.h     a GGUF file's block rows packed into those layouts at load time
//   gguf_strings.h    a GGUF vocabulary's strings read into Python strings, its merges split, at load
//   finite_check.h    whether a model's norms and scales hold NaN or infinity, at load time
//   packed_linear.h   PackedLinear: a linear layer on packed weights, through the best tile built
//   huge_pages.h      packed weights copied onto 2 MiB pages
//   int8_peak.h       the SIMD units' int8 multiply-add rate, the profiler's int8 ceiling
//   attention.h       attention of one token over its positions; paged_ and cached_decode_attention
//   prefill_attention.h  causal attention of a chunk of tokens over a contiguous cache
//   row_ops.h         RMSNorm, SiLU * up and rotary over every row, for the steps outside the fused one
//   scheduler.h       how a step's threads share each phase's work items
//   decoder_stack.h   DecoderLayer, DecoderStack: the fused decode step, phase by phase
// leapllm/kernels/__init__.py builds it for the CPU it runs on (-march=native).

// The headers' classes hold and take types of the unnamed namespace (QuantizedRow), which gives the
// functions that take them internal linkage: called directly and inlined as the compiler sees fit,
// where a shared library's exported functions are called through its symbol table. GCC warns about
// such classes when they are defined in a header, as it cannot know that only one file includes it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wsubobject-linkage"
#endif

#include "attention.h"
#include "common.h"
#include "decoder_stack.h"
#include "finite_check.h"
#include "gguf_blocks.h"
#include "gguf_strings.h"
#include "huge_pages.h"
#include "int8_peak.h"
#include "packed_linear.h"
#include "prefill_attention.h"
#include "row_ops.h"

// A hash of these sources, which the build passes in: the module tells which sources it was built from.
#ifndef LEAPLLM_SOURCE_HASH
#define LEAPLLM_SOURCE_HASH unknown
#endif
#define LEAPLLM_STRINGIFY(x) #x
#define LEAPLLM_STRING(x) LEAPLLM_STRINGIFY(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "leapllm CPU kernels: int4/int8 matmuls on int8 activations (AVX-512 VNNI) and a fused decoder layer";
  m.def("vnni_compiled", &vnni_compiled, "whether the AVX-512 VNNI kernels were compiled in");
  m.def("avx2_compiled", &avx2_compiled, "whether the AVX2 tiles were compiled in (CPUs with AVX2 but no VNNI)");
  m.attr("source_hash") = LEAPLLM_STRING(LEAPLLM_SOURCE_HASH);
  m.def("phase_names", [] {
    pybind11::tuple names(LAYER_PHASES);
    for (int p = 0; p < LAYER_PHASES; ++p) names[p] = PHASE_NAMES[p];
    return names;
  }, "the stage names of a layer's phases in a fused step, in the order of DecoderStack.forward's marks");
  m.def("output_head_phase_name", [] { return std::string(PHASE_NAMES[LAYER_PHASES]); },
        "the stage name of the fused step's output-head phase");
  m.def("int8_peak_ops", &int8_peak_ops, pybind11::arg("iterations"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "int8 multiply-add operations per second of the tiles' instruction on every thread (0: no SIMD tiles)");
  m.def("copy_into_huge_pages", &copy_into_huge_pages, pybind11::arg("tensors"),
        "copies of the tensors in one block of memory on 2 MiB pages where Linux gives them");
  m.def("read_gguf_strings", &read_gguf_strings, pybind11::arg("data"), pybind11::arg("offset"), pybind11::arg("count"),
        "count GGUF strings (uint64 length, UTF-8 bytes) from byte offset of data: (list of str, the offset after)");
  m.def("split_merges", &split_merges, pybind11::arg("merges"),
        "BPE merges 'left right' as (left, right), split at the first space after position 0");
  m.def("first_nonfinite", &first_nonfinite, pybind11::arg("tensors"), pybind11::call_guard<pybind11::gil_scoped_release>(),
        "the index of the first tensor holding a NaN or an infinity, -1 if none");
  m.def("pack_gguf_rows", &pack_gguf_rows_into, pybind11::arg("data"), pybind11::arg("rows"), pybind11::arg("row0"),
        pybind11::arg("ggml_type"), pybind11::arg("in_features"), pybind11::arg("form"), pybind11::arg("outputs"),
        pybind11::arg("group") = 32, pybind11::arg("high_bits") = 0,
        "packs stored GGUF rows data[rows] into rows row0.. of a packed form's outputs (gguf_blocks.h)");
  pybind11::class_<HugePageBlock>(m, "HugePageBlock")
      .def(pybind11::init<int64_t>(), pybind11::arg("bytes"))
      .def("copy", &HugePageBlock::copy, pybind11::arg("tensor"),
           "a copy of the tensor in the block's next free bytes (64-byte aligned), on 2 MiB pages where Linux can")
      .def("empty", &HugePageBlock::empty, pybind11::arg("sizes"), pybind11::arg("dtype"),
           "a tensor in the block's next free bytes (64-byte aligned), its values unset")
      .def("release_unused", &HugePageBlock::release_unused,
           "gives back the whole 2 MiB pages past the bytes used; nothing more fits after")
      .def_static("holds", &HugePageBlock::holds, pybind11::arg("tensor"), "whether the tensor lies in a block")
      .def_static("aligned", &HugePageBlock::aligned, pybind11::arg("bytes"), "bytes a copy takes in the block")
      .def_readonly("capacity", &HugePageBlock::capacity)
      .def_readonly("used", &HugePageBlock::offset);
  m.def("paged_decode_attention", &paged_decode_attention, pybind11::arg("q"), pybind11::arg("k_pool"),
        pybind11::arg("v_pool"), pybind11::arg("slots"), pybind11::arg("lengths"), pybind11::arg("scale"),
        "attention of one new token per sequence over its keys and values in a paged pool",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("cached_decode_attention", &cached_decode_attention, pybind11::arg("q"), pybind11::arg("k_cache"),
        pybind11::arg("v_cache"), pybind11::arg("length"), pybind11::arg("window"), pybind11::arg("scale"),
        "attention of one new token per batch row over its contiguous cache",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rms_norm_rows", &rms_norm_rows, pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("eps"),
        "RMSNorm of every row", pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("silu_and_mul", &silu_and_mul, pybind11::arg("gate_up"), "SiLU(gate) * up of every row",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rotary_rows", &rotary_rows, pybind11::arg("x"), pybind11::arg("cos"), pybind11::arg("sin"),
        "rotate-half rotary embedding of every head of every token",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("cached_prefill_attention", &cached_prefill_attention, pybind11::arg("q"), pybind11::arg("k_cache"),
        pybind11::arg("v_cache"), pybind11::arg("start"), pybind11::arg("window"), pybind11::arg("scale"),
        "causal attention of a chunk of new tokens per batch row over its contiguous cache",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  pybind11::class_<PackedLinear, std::shared_ptr<PackedLinear>>(m, "PackedLinear")
      .def(pybind11::init<at::Tensor, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, int64_t, bool>(),
           pybind11::arg("weight"), pybind11::arg("scales"), pybind11::arg("mins"), pybind11::arg("bias"),
           pybind11::arg("bits"), pybind11::arg("simd") = true)
      .def_static("from_super_blocks", &PackedLinear::from_super_blocks, pybind11::arg("weight"), pybind11::arg("high"),
                  pybind11::arg("sub_scales"), pybind11::arg("sub_mins"), pybind11::arg("super_scales"),
                  pybind11::arg("super_mins"), pybind11::arg("bias"), pybind11::arg("high_bits"), pybind11::arg("group"),
                  pybind11::arg("simd") = true)
      .def_static("from_five_bit_blocks", &PackedLinear::from_five_bit_blocks, pybind11::arg("weight"),
                  pybind11::arg("high"), pybind11::arg("scales"), pybind11::arg("bias"), pybind11::arg("simd") = true)
      .def("forward", &PackedLinear::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("dequantize", &PackedLinear::dequantize, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("dequantize_rows", &PackedLinear::dequantize_rows, pybind11::arg("indices"),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_property_readonly("bias", [](const PackedLinear& l) -> c10::optional<at::Tensor> {
        return l.bias.defined() ? c10::optional<at::Tensor>(l.bias) : c10::nullopt;
      })
      .def_readonly("in_features", &PackedLinear::in_features)
      .def_readonly("out_features", &PackedLinear::out_features)
      .def_readonly("bits", &PackedLinear::bits)
      .def_readonly("simd", &PackedLinear::simd)
      .def_readonly("block_scales", &PackedLinear::block_scales)
      .def_readonly("sub_blocks", &PackedLinear::sub_blocks)
      .def_readonly("float_scales", &PackedLinear::float_scales)
      .def_readonly("narrow_bytes", &PackedLinear::narrow_bytes)
      .def_readonly("small_bytes", &PackedLinear::small_bytes)
      .def_readonly("super_blocks", &PackedLinear::super_blocks)
      .def_readonly("high_bits", &PackedLinear::high_bits)
      .def_readonly("group", &PackedLinear::group)
      .def_readonly("five_bit", &PackedLinear::five_bit)
      .def_property_readonly("kernel", &PackedLinear::kernel);
  pybind11::class_<DecoderLayer, std::shared_ptr<DecoderLayer>>(m, "DecoderLayer")
      .def(pybind11::init<std::shared_ptr<PackedLinear>, std::shared_ptr<PackedLinear>, std::shared_ptr<PackedLinear>,
                          std::shared_ptr<PackedLinear>, at::Tensor, at::Tensor, at::Tensor, double, int64_t, int64_t,
                          int64_t>())
      .def("set_attention", &DecoderLayer::set_attention, pybind11::arg("q_norm"), pybind11::arg("k_norm"),
           pybind11::arg("scale"), pybind11::arg("softcap"), pybind11::arg("window"));
  pybind11::class_<DecoderStack, std::shared_ptr<DecoderStack>>(m, "DecoderStack")
      .def(pybind11::init<std::vector<std::shared_ptr<DecoderLayer>>>())
      .def("set_output_head", &DecoderStack::set_output_head, pybind11::arg("norm_weight"), pybind11::arg("eps"),
           pybind11::arg("head"))
      .def("forward", &DecoderStack::forward, pybind11::arg("x"), pybind11::arg("k_caches"), pybind11::arg("v_caches"),
           pybind11::arg("pos"), pybind11::arg("marks") = pybind11::none(), pybind11::arg("logits") = pybind11::none(),
           pybind11::call_guard<pybind11::gil_scoped_release>());
}

