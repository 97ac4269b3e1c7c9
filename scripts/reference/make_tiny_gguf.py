#!/usr/bin/env python3
"""GGUF copies of the tiny Llama checkpoint + PEFT reference logits on the Q8_0 one, for qpai's
tests of LoRA adapters applied to GGUF bases.

Base: tests/fixtures/tiny/llama-bf16 (made by make_tiny_checkpoints.py; 2 layers, hidden 64,
4 heads, 2 KV heads, head_dim 16, vocab 512, tied embeddings). It is converted with the `gguf`
package's GGUFWriter the way llama.cpp's convert_hf_to_gguf.py converts a LlamaForCausalLM
(Model.set_gguf_parameters + LlamaModel.set_gguf_parameters, LlamaModel.modify_tensors,
Model.prepare_tensors, _set_vocab_gpt2):

    tests/fixtures/tiny/llama-f32.gguf    every tensor F32 (file type ALL_F32)
    tests/fixtures/tiny/llama-q8_0.gguf   2-D weights (projections and token_embd) Q8_0,
                                          norms F32 (file type MOSTLY_Q8_0)

Tensors are named token_embd.weight, output_norm.weight and blk.N.{attn_norm, attn_q, attn_k,
attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}.weight; there is no output.weight, as
the embeddings are tied. attn_q and attn_k are row-permuted like LlamaModel.permute (q with
n_head, k with n_head_kv), the layout llama.cpp's rope expects. The tokenizer is written as a
"gpt2" (byte-level BPE) vocabulary: tokens in id order with the added tokens, token types (3 for
the special added tokens, 1 otherwise), merges, bos/eos/pad ids, add_bos/add_eos flags and the
chat template (via gguf.SpecialVocab, as the converter does). tokenizer.ggml.pre is "gpt-2":
the converter would refuse this made-up vocabulary (its pre-tokenizer hash is unknown), and its
pre-tokenizer is plain ByteLevel with the GPT-2 regex, which is what llama.cpp's "gpt-2" means.

Each file is checked by loading it with transformers (AutoModelForCausalLM, gguf_file=...,
which de-quantizes and un-permutes q/k) and comparing the last-position logits of the three
prompts of tests/fixtures/lora/logits.json with the bf16 checkpoint upcast to float32; it is also
read back with gguf.GGUFReader, de-quantized and un-permuted here, and loaded into the HF model
by hand, as an independent check of the transformers path. The GGUF tokenizer is checked
against tokenizer.json on a few strings.

tests/fixtures/lora/logits_q8_0.json then records, with the Q8_0 file's de-quantized weights as
the (float32) base, the last position's full logits (5 decimals) and top-10 ids of: the base;
and each adapter of tests/fixtures/lora (r4-all, r8-rslora, made by make_lora_fixtures.py)
applied unmerged by PEFT. Same layout as logits.json, plus the GGUF file's sha256.

How to run (CPU, seconds; the venv of make_lora_fixtures.py, which has gguf):

    /tmp/qpai-ref/venv-torch/bin/pip install gguf==0.19.0
    /tmp/qpai-ref/venv-torch/bin/python scripts/reference/make_tiny_gguf.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
from importlib.metadata import version

import gguf
import numpy as np
import peft
import torch
import transformers
from peft import PeftModel
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = os.path.join(ROOT, "tests/fixtures/tiny/llama-bf16")
LORA = os.path.join(ROOT, "tests/fixtures/lora")
ADAPTERS = ["r4-all", "r8-rslora"]
# llama.cpp's names for the per-layer tensors (gguf.TensorNameMap gives the same).
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
FILES = {
    # file name -> (file type, type of the tensors that get quantized)
    "llama-f32.gguf": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "llama-q8_0.gguf": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
# Strings for the tokenizer check: plain words, spaces, digits, punctuation, special tokens.
TOKENIZER_TEXTS = [
    "Hello world, this is a test.",
    "  two  spaces, 12345 digits and 'quotes' don't break",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
]


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF's half-split rope layout to llama.cpp's
    interleaved one, per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """The inverse of permute (what transformers' GGUF loader does)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    parts = hf_name.split(".")  # model.layers.N.<module...>.weight
    assert parts[:2] == ["model", "layers"] and parts[-1] == "weight", hf_name
    return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:-1])]}.weight"


def vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """convert_hf_to_gguf's Model.get_vocab_base: every id's token; added tokens are CONTROL when
    special (or looking like <|...|>), USER_DEFINED otherwise, the rest NORMAL."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            decoder = tokenizer.added_tokens_decoder[i]
            if not decoder.normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if decoder.special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def write_gguf(path: str, file_type: gguf.LlamaFileType, weight_type: gguf.GGMLQuantizationType) -> None:
    with open(os.path.join(BASE, "config.json")) as f:
        hp = json.load(f)
    n_head, n_head_kv = hp["num_attention_heads"], hp["num_key_value_heads"]
    head_dim = hp.get("head_dim", hp["hidden_size"] // n_head)
    writer = gguf.GGUFWriter(path, "llama")  # writes general.architecture

    # Model.prepare_metadata: type, name, then the hyperparameters.
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name("tiny-llama")
    # Model.set_gguf_parameters
    writer.add_block_count(hp["num_hidden_layers"])
    writer.add_context_length(hp["max_position_embeddings"])
    writer.add_embedding_length(hp["hidden_size"])
    writer.add_feed_forward_length(hp["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    # LlamaModel.set_gguf_parameters
    writer.add_vocab_size(hp["vocab_size"])
    writer.add_rope_dimension_count(head_dim)

    # Model._set_vocab_gpt2 (LlamaModel.set_vocab falls back to it: no tokenizer.model).
    tokenizer = transformers.AutoTokenizer.from_pretrained(BASE)
    tokens, types = vocab(tokenizer, hp["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges from tokenizer.json as "a b"; bos/eos/pad ids and add_bos/add_eos from
    # tokenizer_config.json; the chat template.
    gguf.SpecialVocab(BASE, load_merges=True).add_to_gguf(writer, quiet=True)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # Model.prepare_tensors, in the checkpoint's order.
    with safe_open(os.path.join(BASE, "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            data = f.get_tensor(name).to(torch.float32).numpy()  # bf16 is not written as is
            if name.endswith("q_proj.weight"):
                data = permute(data, n_head, n_head)
            elif name.endswith("k_proj.weight"):
                data = permute(data, n_head, n_head_kv)
            new_name = gguf_name(name)
            # 1-D tensors and norms stay F32; the rest take the file's type.
            qtype = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 or new_name.endswith("_norm.weight") else weight_type
            writer.add_tensor(new_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def hf_base() -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(BASE).float()
    model.eval()
    return model


def gguf_base(directory: str, name: str) -> transformers.PreTrainedModel:
    # dequantize=True: plain float32 nn.Linear weights (what PEFT wraps), even where the `kernels`
    # package would let transformers keep Q8_0 blocks and run its own matmul.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32,
        quantization_config=transformers.GgufConfig(dequantize=True))
    model.eval()
    return model


def by_hand(path: str) -> transformers.PreTrainedModel:
    """The HF model with the GGUF file's weights, de-quantized and un-permuted here."""
    model = hf_base()
    config = model.config
    reverse = {gguf_name(n): n for n in model.state_dict() if n != "lm_head.weight"}
    state = {}
    for tensor in gguf.GGUFReader(path).tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        data = data.reshape([int(d) for d in reversed(tensor.shape)])  # GGUF lists dims fastest first
        if ".attn_q." in tensor.name:
            data = unpermute(data, config.num_attention_heads, config.num_attention_heads)
        elif ".attn_k." in tensor.name:
            data = unpermute(data, config.num_attention_heads, config.num_key_value_heads)
        state[reverse[tensor.name]] = torch.from_numpy(np.array(data, dtype=np.float32))  # a writable copy
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def last_logits(model, ids):
    logits = logits_of(model, ids)
    top = torch.topk(logits, 10)
    return {
        "last_logits": [round(float(x), 5) for x in logits],
        "top_ids": [int(i) for i in top.indices],
    }


def max_gap(a, b, prompts) -> float:
    return max(float((logits_of(a, ids) - logits_of(b, ids)).abs().max()) for ids in prompts)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_tokenizer(directory: str, name: str) -> None:
    reference = transformers.AutoTokenizer.from_pretrained(BASE)
    try:
        loaded = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except Exception as e:  # not essential: the weights are what the fixtures are for
        print(f"  tokenizer: transformers cannot load it: {e!r}")
        return
    for text in TOKENIZER_TEXTS:
        want, got = reference.encode(text), loaded.encode(text)
        status = "same ids" if want == got else f"DIFFERENT: {want} vs {got}"
        print(f"  tokenizer {text!r}: {status}")
    print(f"  tokenizer bos/eos: {loaded.bos_token_id}/{loaded.eos_token_id} "
          f"(reference {reference.bos_token_id}/{reference.eos_token_id})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/tiny"),
                        help="directory for the .gguf files")
    parser.add_argument("--logits", default=os.path.join(LORA, "logits_q8_0.json"))
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    with open(os.path.join(LORA, "logits.json")) as f:
        prompts = json.load(f)["prompts"]

    reference = hf_base()
    for name, (file_type, weight_type) in FILES.items():
        path = os.path.join(args.out, name)
        write_gguf(path, file_type, weight_type)
        print(f"{name}: {os.path.getsize(path)} bytes, sha256 {sha256(path)}")
        loaded = gguf_base(args.out, name)
        print(f"  transformers gguf_file vs bf16 base (f32): max |diff| {max_gap(loaded, reference, prompts):.3e}")
        manual = by_hand(path)
        print(f"  un-permuted by hand vs bf16 base (f32):    max |diff| {max_gap(manual, reference, prompts):.3e}")
        print(f"  transformers gguf_file vs by hand:         max |diff| {max_gap(loaded, manual, prompts):.3e}")
        check_tokenizer(args.out, name)

    name = "llama-q8_0.gguf"
    path = os.path.join(args.out, name)
    out = {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "gguf": version("gguf")},
        "base": os.path.relpath(path, ROOT),
        "base_sha256": sha256(path),
        "prompts": prompts,
        "base_logits": [last_logits(gguf_base(args.out, name), ids) for ids in prompts],
        "adapters": {},
    }
    for adapter in ADAPTERS:
        model = PeftModel.from_pretrained(gguf_base(args.out, name), os.path.join(LORA, adapter))
        model.eval()
        unmerged = [last_logits(model, ids) for ids in prompts]
        change = max(abs(a - b) for u, b0 in zip(unmerged, out["base_logits"])
                     for a, b in zip(u["last_logits"], b0["last_logits"]))
        out["adapters"][adapter] = {"unmerged": unmerged}
        print(f"{adapter} on {name}: change from base {change:.3f}")
    with open(args.logits, "w") as f:
        json.dump(out, f)
    print(f"wrote {args.logits}")


if __name__ == "__main__":
    main()
