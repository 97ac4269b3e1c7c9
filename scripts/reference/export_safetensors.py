#!/usr/bin/env python3
"""Export a llama-architecture GGUF file as an HF-style float32 checkpoint directory.

Usage:
    python3 -m venv /tmp/venv-light
    /tmp/venv-light/bin/pip install -r scripts/reference/requirements-light.txt
    /tmp/venv-light/bin/python scripts/reference/export_safetensors.py GGUF_PATH OUT_DIR

Writes into OUT_DIR:
    config.json            LlamaForCausalLM config read from the GGUF metadata (torch_dtype float32)
    model.safetensors      every tensor dequantized to float32, under the Hugging Face names
                           (model.embed_tokens.weight, model.layers.N.self_attn.q_proj.weight, ...,
                           model.norm.weight; lm_head.weight only when the GGUF has output.weight).
                           attn_q / attn_k rows are un-permuted from llama.cpp's rotary layout back
                           to the Hugging Face layout.
    tokenizer.json         the tokenizer transformers builds from the GGUF metadata
    tokenizer_config.json  (+ chat_template.jinja when the GGUF has tokenizer.chat_template)
    export_source.json     the source GGUF's name and sha256

No torch needed: gguf-py reads and dequantizes (numpy), safetensors.numpy writes, and the tokenizer
conversion is transformers' own `convert_gguf_tokenizer`. transformers' `AutoTokenizer(...,
gguf_file=...)` cannot be used here because its GGUF metadata reader imports torch; this script
reads the same metadata with gguf-py and hands it to the same converter. make_fixtures.py checks
that the result equals what `AutoTokenizer.from_pretrained(dir, gguf_file=...)` builds and that the
exported weights give the same logits as transformers' own GGUF loader.

The output is deterministic: the same GGUF gives byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

# Names of the per-layer tensors: GGUF suffix -> HF suffix.
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Same keys as transformers.integrations.gguf.gguf_tokenizer_mapping.GGUF_TOKENIZER_MAPPING
# (copied so the metadata can be read without transformers' torch-importing reader; the
# script fails loudly if transformers' mapping ever differs).
TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type",
    "ggml.pre": "pre_tokenizer_type",
    "ggml.tokens": "tokens",
    "ggml.scores": "scores",
    "ggml.token_type": "token_type",
    "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap",
    "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id",
    "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id",
    "ggml.add_space_prefix": "add_prefix_space",
}
TOKENIZER_CONFIG_KEYS = {
    "chat_template": "chat_template",
    "ggml.add_bos_token": "add_bos_token",
    "ggml.add_eos_token": "add_eos_token",
}
SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def read_metadata(reader: GGUFReader) -> dict:
    """Every metadata key -> python value (strings decoded, arrays as lists)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def f32_number(value: float) -> float:
    """The shortest decimal that round-trips to the same float32 (GGUF stores f32: 1e-5, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def build_config(meta: dict, tensor_names: set[str]) -> dict:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise SystemExit(f"only llama-architecture GGUF files are supported, this one is {arch!r}")
    unsupported = [k for k in meta if k.startswith("llama.rope.scaling.") or k.startswith("llama.expert_")]
    if unsupported or "rope_freqs.weight" in tensor_names:
        raise SystemExit(f"unsupported llama variant (rope scaling / experts): {unsupported or ['rope_freqs.weight']}")

    heads = int(meta["llama.attention.head_count"])
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    hidden = int(meta["llama.embedding_length"])
    head_dim = int(meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", hidden // heads)))
    vocab = int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])))
    rope_theta = f32_number(meta.get("llama.rope.freq_base", 10000.0))

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": f32_number(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": rope_theta,
        # transformers >= 5 reads rope_parameters; older readers (and candle) read rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": int(meta["llama.context_length"]),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[name] = int(value)
    return config


def reverse_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of q/k rows (same as transformers' GGUF loader)."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return np.ascontiguousarray(w.swapaxes(2, 1).reshape(weights.shape))


def hf_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in LAYER_TENSORS:
        return f"model.layers.{int(m.group(1))}.{LAYER_TENSORS[m.group(2)]}"
    raise SystemExit(f"unexpected tensor in llama GGUF: {gguf_name}")


def export_tensors(reader: GGUFReader, config: dict) -> dict[str, np.ndarray]:
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        qtype = GGMLQuantizationType(tensor.tensor_type)
        values = dequantize(tensor.data, qtype)
        shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists dims fastest-first
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        if tensor.name.endswith(".attn_q.weight"):
            values = reverse_permute(values, heads)
        elif tensor.name.endswith(".attn_k.weight"):
            values = reverse_permute(values, kv_heads)
        out[name] = np.ascontiguousarray(values, dtype=np.float32)
    if config["tie_word_embeddings"]:
        out.pop("lm_head.weight", None)
    return out


def tokenizer_inputs(meta: dict) -> tuple[str, dict, dict]:
    """What transformers' get_gguf_tokenizer returns: (architecture, tokenizer_dict, tokenizer_config)."""
    tok = {name: meta[f"tokenizer.{key}"] for key, name in TOKENIZER_KEYS.items() if f"tokenizer.{key}" in meta}
    cfg = {name: meta[f"tokenizer.{key}"] for key, name in TOKENIZER_CONFIG_KEYS.items() if f"tokenizer.{key}" in meta}
    if tok.get("tokenizer_type") == "llama":
        cfg.setdefault("add_bos_token", True)
    elif tok.get("tokenizer_type") == "gemma4":
        cfg["add_bos_token"] = False
    for name, key in SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        cfg[name] = tok["tokens"][token_id] if token_id is not None else None
    return meta["general.architecture"], tok, cfg


def build_tokenizer(meta: dict):
    """(transformers tokenizer, tokenizer_config) as AutoTokenizer(..., gguf_file=...) would build them."""
    from transformers.integrations.gguf import gguf_tokenizer_mapping as tm
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if tm.GGUF_TOKENIZER_MAPPING != {"tokenizer": TOKENIZER_KEYS, "tokenizer_config": TOKENIZER_CONFIG_KEYS}:
        raise SystemExit("transformers' GGUF tokenizer key mapping changed; update TOKENIZER_KEYS")
    architecture, tok_dict, tok_cfg = tokenizer_inputs(meta)
    backend, extra = tm.convert_gguf_tokenizer(architecture, tok_dict)
    tok_cfg.update(extra)
    # The wrapper sets the post-processor (BOS/EOS insertion) from add_bos_token / add_eos_token.
    tokenizer = TokenizersBackend(tokenizer_object=backend, **tok_cfg)
    tokenizer.name_or_path = ""
    return tokenizer, tok_cfg


def export_tokenizer(meta: dict, out_dir: str) -> None:
    tokenizer, tok_cfg = build_tokenizer(meta)
    tokenizer.save_pretrained(out_dir)

    # save_pretrained leaves out add_bos_token / add_eos_token and moves the template to
    # chat_template.jinja; put them in tokenizer_config.json too, for readers that only look there.
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    for key in ("add_bos_token", "add_eos_token", "chat_template"):
        if key in tok_cfg:
            saved[key] = tok_cfg[key]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(saved, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("gguf_path")
    parser.add_argument("out_dir")
    args = parser.parse_args()

    t0 = time.perf_counter()
    os.makedirs(args.out_dir, exist_ok=True)
    reader = GGUFReader(args.gguf_path)
    meta = read_metadata(reader)
    tensor_names = {t.name for t in reader.tensors}
    config = build_config(meta, tensor_names)

    tensors = export_tensors(reader, config)
    # Only one metadata key: safetensors writes the metadata map in hash order, so a second key
    # would make the file bytes vary from run to run.
    save_file(tensors, os.path.join(args.out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(args.out_dir, "export_source.json"), "w", encoding="utf-8") as f:
        source = {"gguf_file": os.path.basename(args.gguf_path), "gguf_sha256": sha256(args.gguf_path),
                  "exporter": "scripts/reference/export_safetensors.py"}
        json.dump(source, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(args.out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    export_tokenizer(meta, args.out_dir)
    n_params = sum(t.size for t in tensors.values())
    print(
        f"exported {len(tensors)} tensors ({n_params:,} params, float32) to {args.out_dir} "
        f"in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
