#!/usr/bin/env python3
"""qpai's embedding backends vs Python ONNX Runtime, same texts, same threads.

Runs `qpai bench-embeddings` for the int8 ONNX model (qpai's `ort` backend)
and for the f32 safetensors model (qpai's packed CPU encoder), then Python
`onnxruntime` on the very same model.onnx file with the same tokenizer.json,
batches, mean pooling and normalisation: once with the texts in the order
given (padded to the longest text of each batch, as a client would send
them) and once sorted by length first (the least padding ONNX Runtime can
get). qpai gets all texts in one call, as a request or an ingest batch
hands them over, and batches them itself. Tokenization is outside the
timed region on every side. Two text sets:
`short`, the retrieval eval's queries (about 17 tokens), and `chunks`, runs of
22 queries joined (about 145 tokens, up to 256: ingest chunks are up to 200).
Prints a Markdown table with texts/s and the ratio to Python ONNX Runtime.

Usage (see docs/perf.md):
    ~/.cache/qpai-bench-venv/bin/pip install -r benches/requirements.txt
    ~/.cache/qpai-bench-venv/bin/python benches/embeddings_compare.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def texts(limit: int, join: int) -> list[str]:
    """Real documentation sentences: the retrieval eval's queries, `join` to
    a text, repeated to `limit` texts."""
    path = os.path.join(ROOT, "eval/retrieval/postgresql-15.jsonl")
    with open(path) as f:
        base = [json.loads(line)["query"] for line in f if line.strip()]
    return [" ".join(base[(i * join + j) % len(base)] for j in range(join))
            for i in range(limit)]


def models_dir() -> str:
    if os.environ.get("QPAI_MODELS_DIR"):
        return os.environ["QPAI_MODELS_DIR"]
    data = os.environ.get("QPAI_DATA_DIR", os.path.expanduser("~/.local/share/qpai"))
    return os.path.join(data, "models")


def run_qpai(binary: str, model: str, input_path: str, texts: int, args) -> dict:
    """All texts in one call, as one request or one ingest batch hands them
    over; qpai batches them itself."""
    cmd = [binary, "bench-embeddings", "--model", model, "--input", input_path,
           "--threads", str(args.threads), "--batch", str(texts), "--runs", str(args.runs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_python_ort(all_texts: list[str], args, sort: bool) -> float:
    model_dir = os.path.join(models_dir(), "all-minilm-l6-v2-int8")
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(256)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    encoded = [e.ids for e in tokenizer.encode_batch(all_texts)]
    if sort:
        encoded.sort(key=len)
    batches = []
    for start in range(0, len(encoded), args.batch):
        rows = encoded[start:start + args.batch]
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        batches.append((ids, mask))

    def run_once():
        for ids, mask in batches:
            hidden = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                        "token_type_ids": np.zeros_like(ids)})[0]
            m = mask[:, :, None].astype(np.float32)
            mean = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
            mean / np.clip(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12, None)

    run_once()  # warm-up
    best = min(_timed(run_once) for _ in range(args.runs))
    return len(all_texts) / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--qpai", help="qpai binary (default: the dev build in CARGO_TARGET_DIR)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--texts", type=int, default=512, help="texts per set (chunks: a quarter)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target"))
    binary = args.qpai or os.path.join(target, "debug", "qpai")
    print(f"batch {args.batch}, {args.threads} threads, best of {args.runs}; "
          f"onnxruntime {ort.__version__}\n")
    print("| texts | backend | model | texts/s | vs Python onnxruntime |")
    print("|---|---|---|---|---|")
    for name, count, join in [("short", args.texts, 1), ("chunks", args.texts // 4, 22)]:
        all_texts = texts(count, join)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(t.replace("\n", " ") for t in all_texts))
            input_path = f.name
        try:
            onnx = run_qpai(binary, "all-minilm-l6-v2-int8", input_path, len(all_texts), args)
            packed = run_qpai(binary, "all-minilm-l6-v2", input_path, len(all_texts), args)
            python = run_python_ort(all_texts, args, sort=False)
            python_sorted = run_python_ort(all_texts, args, sort=True)
        finally:
            os.unlink(input_path)
        label = f"{name}: {len(all_texts)} ({onnx['tokens']} tokens)"
        rows = [
            ("Python onnxruntime, in order", "int8 ONNX", python),
            ("Python onnxruntime, sorted by length", "int8 ONNX", python_sorted),
            (f"qpai {onnx['backend']}", "int8 ONNX", onnx["texts_per_s"]),
            (f"qpai {packed['backend']}", "f32 safetensors", packed["texts_per_s"]),
        ]
        for backend, model, rate in rows:
            print(f"| {label} | {backend} | {model} | {rate:.1f} | {rate / python:.2f}x |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
