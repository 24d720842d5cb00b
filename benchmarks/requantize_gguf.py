"""Write a copy of a GGUF file with every matrix re-quantized to another llama.cpp type (Q8_0 by default).

    .venv/bin/python benchmarks/requantize_gguf.py IN.gguf OUT.gguf [--type Q8_0]

leapllm-int8 is int8 per output channel, the precision of a Q8_0 file; the default model ships as
Q4_1 only. This gives llama.cpp a Q8_0 file of the same model (its Q4_1 weights, dequantized and
stored again in Q8_0 blocks with the `gguf` package's own quantizer), so `leapllm bench --model
OUT.gguf` compares leapllm-int8 with llama.cpp at matching precision. Metadata (tokenizer, chat
template, shapes) is copied as is; 1-D tensors (norms) stay as they are.
"""

from __future__ import annotations

import argparse

from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, quants

FILE_TYPES = {"Q8_0": LlamaFileType.MOSTLY_Q8_0, "Q4_0": LlamaFileType.MOSTLY_Q4_0, "F16": LlamaFileType.MOSTLY_F16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source")
    p.add_argument("output")
    p.add_argument("--type", default="Q8_0", choices=sorted(FILE_TYPES))
    args = p.parse_args()
    qtype = GGMLQuantizationType[args.type]
    reader = GGUFReader(args.source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(args.output, arch)
    for field in reader.fields.values():
        if field.name in ("general.architecture", "general.file_type") or field.name.startswith("GGUF."):
            continue  # the writer adds the architecture itself; the file type changes
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(FILE_TYPES[args.type])
    for t in reader.tensors:
        if len(t.shape) < 2:
            writer.add_tensor(t.name, quants.dequantize(t.data, t.tensor_type))
            continue
        dense = quants.dequantize(t.data, t.tensor_type)  # (rows, columns) float32
        writer.add_tensor(t.name, quants.quantize(dense, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {args.output} ({args.type} matrices)")


if __name__ == "__main__":
    main()
