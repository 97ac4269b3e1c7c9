#!/usr/bin/env python3
"""Copy a float32 safetensors checkpoint directory as bfloat16 (round to nearest even).

Most Hugging Face checkpoints ship in bf16; the f32 copy of SmolLM2 that the tests export
(scripts/reference/export_safetensors.py) is turned into one to measure the bf16 path:

    python benches/checkpoint_to_bf16.py ~/.local/share/qpai/test-fixtures/smollm2-135m-f32 /tmp/smollm2-bf16
    qpai bench --model /tmp/smollm2-bf16 --threads 2

Needs numpy and safetensors (the test venv has both). The safetensors file is written by hand:
the numpy API of safetensors has no bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct

import numpy as np
from safetensors.numpy import load_file


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def write_bf16(tensors: dict[str, np.ndarray], path: str) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        data = to_bf16_bits(tensors[name]).tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source")
    parser.add_argument("target")
    args = parser.parse_args()
    os.makedirs(args.target, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for name in sorted(os.listdir(args.source)):
        path = os.path.join(args.source, name)
        if name.endswith(".safetensors"):
            tensors.update(load_file(path))
        elif name == "config.json":
            with open(path) as f:
                config = json.load(f)
            config["torch_dtype"] = "bfloat16"
            config.pop("dtype", None)
            with open(os.path.join(args.target, name), "w") as f:
                json.dump(config, f, indent=2)
        elif os.path.isfile(path):
            shutil.copy(path, args.target)
    write_bf16(tensors, os.path.join(args.target, "model.safetensors"))
    print(f"wrote {len(tensors)} tensors as bfloat16 to {args.target}")


if __name__ == "__main__":
    main()
