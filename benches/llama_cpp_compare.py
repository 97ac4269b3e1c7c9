#!/usr/bin/env python3
"""qpai vs llama.cpp on the same GGUF file, token ids and thread count.

Or on the same weights: qpai on a safetensors checkpoint (`--model DIR`), llama.cpp on a GGUF
of the same values (`--peer-gguf`, made by benches/gguf_widen.py).

Runs `qpai bench` (prefill, decode, time to first token from qpai's own
forward pass) and then llama.cpp through llama-cpp-python on exactly the same
prompt token ids, greedy, and prints a Markdown table with the ratios.

Build llama-cpp-python from source with explicit ISA flags, never
-march=native (llama.cpp's native build crashes in its AMX path on CPUs that
report AMX); drop the AVX-512 / VNNI options on CPUs without them.

Usage (see docs/perf.md):
    python3 -m venv ~/.cache/qpai-bench-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
        -DGGML_AVX512_VNNI=ON -DGGML_AVX_VNNI=ON" \
        ~/.cache/qpai-bench-venv/bin/pip install -r benches/requirements.txt   # builds llama.cpp
    ~/.cache/qpai-bench-venv/bin/python benches/llama_cpp_compare.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from llama_cpp import Llama


def run_qpai(args, json_path):
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target"))
    binary = args.qpai or os.path.join(target, "debug", "qpai")
    cmd = [
        binary, "bench", "--model", args.model, "--threads", str(args.threads),
        "--prompt-tokens", str(args.prompt_tokens), "--decode-tokens", str(args.decode_tokens),
        "--runs", str(args.runs), "--json", json_path,
    ]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    with open(json_path) as f:
        return json.load(f)


def gguf_path(model_id):
    out = subprocess.run(
        [os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target")), "debug", "qpai"),
         "models", "pull", model_id],
        check=True, capture_output=True, text=True,
    ).stdout
    return out.strip().split(": ", 1)[1]


def run_llama_cpp(path, ids, decode_tokens, threads, runs):
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=len(ids) + decode_tokens + 8,
                n_batch=512, verbose=False)
    prefill, decode, ttft = [], [], []
    for run in range(runs + 1):  # the first run warms up
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode_tokens):
            llm.eval([nxt])
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode_s = time.perf_counter() - start
        if run > 0:
            prefill.append(len(ids) / first)
            decode.append(decode_tokens / decode_s)
            ttft.append(first * 1000)
    return {
        "prefill_tokens_per_s": statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
        "time_to_first_token_ms": statistics.median(ttft),
    }


def llama_cpp_isa():
    """The CPU features llama.cpp reports it was built with and uses."""
    import llama_cpp
    info = llama_cpp.llama_print_system_info().decode()
    used = [part.strip() for part in info.replace("|", ";").split(";") if part.strip().endswith("= 1")]
    return ", ".join(p.split(" =")[0] for p in used) or info


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--qpai", help="path of the qpai binary")
    p.add_argument("--peer-gguf", help="the GGUF file llama.cpp runs (default: the catalog model's); "
                   "for a checkpoint --model, its weights as a GGUF (benches/gguf_widen.py)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        qpai = run_qpai(args, os.path.join(tmp, "qpai.json"))
    ids = qpai["prompt_ids"]
    peer_file = args.peer_gguf or gguf_path(args.model)
    peer = run_llama_cpp(peer_file, ids, args.decode_tokens, args.threads, args.runs)

    rows = [
        ("prefill tokens/s", "prefill_tokens_per_s", True),
        ("decode tokens/s", "decode_tokens_per_s", True),
        ("time to first token (ms)", "time_to_first_token_ms", False),
    ]
    print(f"model {args.model}, {len(ids)} prompt tokens, {args.decode_tokens} decoded, "
          f"{args.threads} threads, median of {args.runs} runs")
    print(f"qpai kernels: {qpai['kernels']}; llama.cpp: {llama_cpp_isa()}, on {os.path.basename(peer_file)}")
    print()
    print("| metric | qpai | llama.cpp | qpai / llama.cpp |")
    print("|---|---|---|---|")
    for label, key, higher_better in rows:
        ratio = qpai[key] / peer[key] if higher_better else peer[key] / qpai[key]
        print(f"| {label} | {qpai[key]:.1f} | {peer[key]:.1f} | {ratio:.2f}x |")
    bandwidth = qpai["memory_bandwidth_gb_s"] * 1e9
    per_token = qpai["weight_bytes"]
    print(f"| decode share of the bandwidth bound ({per_token / 1e6:.1f} MB a token, "
          f"{bandwidth / 1e9:.1f} GB/s) | {qpai['decode_tokens_per_s'] * per_token / bandwidth:.0%} "
          f"| {peer['decode_tokens_per_s'] * per_token / bandwidth:.0%} | |")
    print()
    print("(ratios: higher is better for qpai; for time to first token the ratio is llama.cpp time / qpai time)")


if __name__ == "__main__":
    main()
