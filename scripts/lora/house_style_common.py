"""Shared bits of the house-style LoRA scripts: the base model (SmolLM2-135M-Instruct, the Q4_1
GGUF de-quantized to f32 by transformers), the chat rendering, and the format checker."""

from __future__ import annotations

import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from make_house_style_dataset import FORMAT_RE, adheres  # noqa: E402,F401  (same directory)

GGUF_DIR = os.environ.get("QPAI_SMOLLM2_DIR", "/root/.local/share/qpai/models/smollm2-135m-instruct")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DATA = os.path.join(ROOT, "data", "house-style")
ADAPTER = os.path.join(ROOT, "models", "adapters", "house-style")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_jsonl(split: str) -> list[dict]:
    with open(os.path.join(DATA, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_base(check_sha: bool = True, attn: str = "eager"):
    """(model, tokenizer): the GGUF de-quantized to float32, eval mode. attn: eager (the
    reference fixtures' choice) or sdpa (faster training)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(GGUF_DIR, GGUF_FILE)
    if check_sha and sha256_file(path) != GGUF_SHA256:
        sys.exit(f"{path}: sha256 differs from {GGUF_SHA256}")
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        GGUF_DIR, gguf_file=GGUF_FILE, dtype=torch.float32, attn_implementation=attn
    )
    rope = getattr(model.config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(model.config, "rope_theta", None))
    assert theta == 100000.0, f"rope theta {theta}, expected 100000 (SmolLM2)"
    model.eval()
    return model, tok


def prompt_messages(prompt: str) -> list[dict]:
    # No system message: the template then adds SmolLM2's default one, as qpai's chat does.
    return [{"role": "user", "content": prompt}]


def prompt_ids(tok, prompt: str) -> list[int]:
    out = tok.apply_chat_template(prompt_messages(prompt), tokenize=True, add_generation_prompt=True,
                                  return_dict=True)
    return list(out["input_ids"])
