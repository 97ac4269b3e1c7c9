#!/usr/bin/env python3
"""Copy a GGUF file with its matrices dequantized to F32 or BF16, for llama.cpp to run the
same weights as a safetensors checkpoint exported from that file.

The f32 safetensors copy of SmolLM2 (scripts/reference/export_safetensors.py) holds the
Q4_1 file's weights dequantized; this script writes the same weights as a GGUF, so that
llama.cpp and qpai's safetensors path compute with identical values:

    python benches/gguf_widen.py SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2-f32.gguf --type f32
    python benches/llama_cpp_compare.py --model ~/.local/share/qpai/test-fixtures/smollm2-135m-f32 \
        --peer-gguf /tmp/smollm2-f32.gguf

Needs numpy and gguf (the test venv has both). Vectors (norms) stay F32, as llama.cpp wants.
"""

from __future__ import annotations

import argparse

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--type", choices=["f32", "bf16"], default="f32")
    args = parser.parse_args()
    reader = GGUFReader(args.source)
    architecture = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(args.target, architecture)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        if field.name == "general.file_type":
            continue
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    wanted = GGMLQuantizationType.F32 if args.type == "f32" else GGMLQuantizationType.BF16
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if values.ndim >= 2 and wanted == GGMLQuantizationType.BF16:
            data = quantize(values, GGMLQuantizationType.BF16)
            writer.add_tensor(tensor.name, data, raw_dtype=wanted)
        else:
            writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {len(reader.tensors)} tensors ({args.type} matrices) to {args.target}")


if __name__ == "__main__":
    main()
