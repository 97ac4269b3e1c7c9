#!/usr/bin/env python3
"""Seeds of the binary fuzz targets, written into fuzz/corpus (run again, it writes the
same bytes):

    gguf                tiny GGUF files as qpai's loader reads them: a llama with a byte-level
                        BPE ("gpt2") tokenizer and a ChatML template (Q8_0 projections, and
                        one all-F32), a Gemma 3 with a SentencePiece ("llama") tokenizer, the
                        metadata alone (v3 and v2 headers), and an architecture without a
                        tokenizer
    safetensors_header  small adapter_model.safetensors files for the tiny llama of
                        tests/fixtures/tiny (rank 4, as the target reads them) in F32, F16
                        and BF16, with and without __metadata__; one with a NaN, one with a
                        tensor that is no LoRA factor, one with a lone factor, and an empty one
    peft_adapter        adapter_config.json, a NUL byte, then tensor names one per line: the
                        two adapters of tests/fixtures/lora, and configurations qpai refuses

and, into fuzz/regressions/gguf, the headers of `gguf_regressions` below.

Every model is one layer with hidden size 32 (2 heads and 1 KV head of 16, MLP 32), its
weights made from a sine, so the files stay a few KiB. The writers are the `gguf`
package's GGUFWriter and a hand-written safetensors encoder (for BF16, which numpy lacks).

How to run (the light reference venv has gguf, numpy and safetensors):

    python scripts/fuzz/seeds.py
"""

from __future__ import annotations

import json
import os
import struct
import tempfile

import gguf
import numpy as np
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
LORA = os.path.join(ROOT, "tests", "fixtures", "lora")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, CONTEXT = 32, 2, 1, 16, 32, 64
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]


def weights(shape: tuple[int, ...], phase: float) -> np.ndarray:
    """Deterministic values in [-0.5, 0.5]."""
    count = int(np.prod(shape))
    return (0.5 * np.sin(np.arange(count, dtype=np.float64) * 0.37 + phase)).astype(np.float32).reshape(shape)


def write(target: str, name: str, data: bytes) -> None:
    directory = os.path.join(CORPUS, target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)
    print(f"{target}/{name}: {len(data)} bytes")


def gguf_bytes(build) -> bytes:
    """The bytes GGUFWriter writes for what `build(writer)` adds."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.gguf")
        writer = build(path)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(path, "rb") as f:
            return f.read()


def hyperparameters(writer: gguf.GGUFWriter, blocks: int = 1, heads: int = HEADS, context: int = CONTEXT) -> None:
    writer.add_block_count(blocks)
    writer.add_context_length(context)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(heads)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_dimension_count(HEAD_DIM)


def gpt2_vocab(writer: gguf.GGUFWriter) -> int:
    """A byte-level BPE vocabulary: three special tokens, the space and the letters, two merges."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "\u0120"] + LETTERS + ["\u0120t", "he"]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["\u0120 t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    return len(tokens)


def sentencepiece_vocab(writer: gguf.GGUFWriter) -> int:
    """A SentencePiece vocabulary: specials, the word boundary, letters and two pieces, scored."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens = specials + ["\u2581"] + LETTERS[:23] + ["\u2581t", "he"]
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 2
    types += [gguf.TokenType.NORMAL] * (len(tokens) - len(specials))
    scores = [0.0] * len(specials) + [-float(i) for i in range(len(tokens) - len(specials))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_eot_token_id(5)
    writer.add_add_bos_token(True)
    return len(tokens)


def add(writer: gguf.GGUFWriter, name: str, shape: tuple[int, ...], qtype, phase: float) -> None:
    data = weights(shape, phase)
    if name.endswith("norm.weight"):
        data = data + 1.0
        qtype = gguf.GGMLQuantizationType.F32
    writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def layer_tensors(writer: gguf.GGUFWriter, vocab: int, qtype, gemma: bool) -> None:
    add(writer, "token_embd.weight", (vocab, HIDDEN), qtype, 0.0)
    add(writer, "output_norm.weight", (HIDDEN,), qtype, 0.1)
    shapes = {
        "attn_q": (HEADS * HEAD_DIM, HIDDEN),
        "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_output": (HIDDEN, HEADS * HEAD_DIM),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
        "attn_norm": (HIDDEN,),
        "ffn_norm": (HIDDEN,),
    }
    if gemma:
        shapes.update({
            "attn_q_norm": (HEAD_DIM,),
            "attn_k_norm": (HEAD_DIM,),
            "post_attention_norm": (HIDDEN,),
            "post_ffw_norm": (HIDDEN,),
        })
    for i, (name, shape) in enumerate(shapes.items()):
        add(writer, f"blk.0.{name}.weight", shape, qtype, 1.0 + i)


def llama(qtype, with_tensors: bool = True, **counts):
    """`counts` overrides hyperparameters' block, head and context counts."""
    def build(path: str) -> gguf.GGUFWriter:
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_name("fuzz-llama")
        hyperparameters(writer, **counts)
        writer.add_rope_freq_base(10000.0)
        vocab = gpt2_vocab(writer)
        if with_tensors:
            layer_tensors(writer, vocab, qtype, gemma=False)
        return writer
    return build


def gemma3(path: str) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_name("fuzz-gemma3")
    hyperparameters(writer)
    writer.add_rope_freq_base(1000000.0)
    writer.add_float32("gemma3.rope.local_freq_base", 10000.0)
    writer.add_sliding_window(16)
    vocab = sentencepiece_vocab(writer)
    layer_tensors(writer, vocab, gguf.GGMLQuantizationType.Q8_0, gemma=True)
    return writer


def no_tokenizer(path: str) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(path, "llama")
    hyperparameters(writer)
    return writer


def gguf_seeds() -> None:
    write("gguf", "llama_q8_0.gguf", gguf_bytes(llama(gguf.GGMLQuantizationType.Q8_0)))
    write("gguf", "llama_f32.gguf", gguf_bytes(llama(gguf.GGMLQuantizationType.F32)))
    write("gguf", "gemma3_q8_0.gguf", gguf_bytes(gemma3))
    metadata_only = gguf_bytes(llama(gguf.GGMLQuantizationType.Q8_0, with_tensors=False))
    write("gguf", "llama_metadata_only_v3.gguf", metadata_only)
    # Version 2 has the layout of version 3 (64-bit lengths, little-endian).
    assert struct.unpack_from("<I", metadata_only, 4)[0] == 3
    write("gguf", "llama_metadata_only_v2.gguf", metadata_only[:4] + struct.pack("<I", 2) + metadata_only[8:])
    write("gguf", "llama_without_tokenizer.gguf", gguf_bytes(no_tokenizer))


def safetensors_bytes(tensors: list[tuple[str, str, tuple[int, ...], bytes]], metadata: dict | None) -> bytes:
    """The safetensors encoding of (name, dtype, shape, data) in this order."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the writers do
    return struct.pack("<Q", len(text)) + text + b"".join(data for *_, data in tensors)


def encoded(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "F32":
        return values.astype("<f4").tobytes()
    if dtype == "F16":
        return values.astype("<f2").tobytes()
    if dtype == "BF16":
        return (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    raise ValueError(dtype)


def factor(layer: int, block: str, projection: str, half: str) -> str:
    return f"base_model.model.model.layers.{layer}.{block}.{projection}.lora_{half}.weight"


def pair(layer: int, block: str, projection: str, inputs: int, outputs: int, dtype: str, rank: int = 4):
    a = weights((rank, inputs), 0.5 + layer)
    b = weights((outputs, rank), 1.5 + layer)
    return [
        (factor(layer, block, projection, "A"), dtype, (rank, inputs), encoded(a, dtype)),
        (factor(layer, block, projection, "B"), dtype, (outputs, rank), encoded(b, dtype)),
    ]


def safetensors_seeds() -> None:
    meta = {"format": "pt"}
    write("safetensors_header", "q_proj_f32.safetensors",
          safetensors_bytes(pair(0, "self_attn", "q_proj", 64, 64, "F32"), meta))
    write("safetensors_header", "k_v_proj_f16.safetensors",
          safetensors_bytes(pair(1, "self_attn", "k_proj", 64, 32, "F16")
                            + pair(1, "self_attn", "v_proj", 64, 32, "F16"), None))
    write("safetensors_header", "down_proj_bf16.safetensors",
          safetensors_bytes(pair(0, "mlp", "down_proj", 128, 64, "BF16"), meta))
    nan = pair(0, "self_attn", "o_proj", 64, 64, "F32")
    name, dtype, shape, data = nan[1]
    nan[1] = (name, dtype, shape, struct.pack("<f", float("nan")) + data[4:])
    write("safetensors_header", "o_proj_nan.safetensors", safetensors_bytes(nan, meta))
    head = [("base_model.model.lm_head.weight", "F32", (4, 8), encoded(weights((4, 8), 0.0), "F32"))]
    write("safetensors_header", "not_a_factor.safetensors", safetensors_bytes(head, meta))
    write("safetensors_header", "lone_factor.safetensors",
          safetensors_bytes(pair(0, "mlp", "up_proj", 64, 128, "F32")[:1], meta))
    write("safetensors_header", "rank_8.safetensors",
          safetensors_bytes(pair(0, "mlp", "gate_proj", 64, 128, "F16", rank=8), meta))
    write("safetensors_header", "empty.safetensors", safetensors_bytes([], None))


def peft_seeds() -> None:
    def seed(config: str, names: list[str]) -> bytes:
        return config.encode() + b"\0" + "".join(f"{n}\n" for n in names).encode()

    for adapter in ["r4-all", "r8-rslora"]:
        with open(os.path.join(LORA, adapter, "adapter_config.json")) as f:
            config = f.read()
        with safe_open(os.path.join(LORA, adapter, "adapter_model.safetensors"), "np") as f:
            names = sorted(f.keys())
        write("peft_adapter", f"{adapter}.bin", seed(config, names))
    plain = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "down_proj"]}
    names = [factor(0, "self_attn", "q_proj", "A"), factor(0, "self_attn", "q_proj", "B"),
             factor(1, "mlp", "down_proj", "A"), factor(1, "mlp", "down_proj", "B")]
    write("peft_adapter", "r2_two_targets.bin", seed(json.dumps(plain), names))
    write("peft_adapter", "untargeted_and_unknown_names.bin",
          seed(json.dumps(plain), [factor(0, "self_attn", "v_proj", "A"), "base_model.model.lm_head.weight",
                                   "base_model.model.model.layers.x.mlp.up_proj.lora_A.weight"]))
    write("peft_adapter", "all_linear_config_only.bin",
          json.dumps({"r": 4, "lora_alpha": 4, "target_modules": "all-linear", "use_rslora": True}).encode())
    for name, extra in [
        ("dora", {"use_dora": True}),
        ("modules_to_save", {"modules_to_save": ["lm_head"]}),
        ("rank_pattern", {"rank_pattern": {"q_proj": 4}}),
        ("bias_all", {"bias": "all"}),
        ("ia3", {"peft_type": "IA3"}),
        ("rank_0", {"r": 0}),
        ("pattern_targets", {"target_modules": ".*proj"}),
    ]:
        write("peft_adapter", f"refused_{name}.bin", seed(json.dumps({**plain, **extra}), names[:2]))


def gguf_regressions() -> None:
    """Headers whose counts once sized allocations or divided before being checked against the
    file: a block count past the blocks present (a 2^31-entry layer list), no heads (a division
    by zero), and a context of 2^32 - 1 positions (rotary tables and a KV pool of that size).
    A context of 2^24 positions is kept too: it loads where the pool fits in memory, and its
    pages must stay uncommitted."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, counts in [
        ("block_count_past_tensors.gguf", {"blocks": 2**31}),
        ("head_count_zero.gguf", {"heads": 0}),
        ("context_length_u32_max.gguf", {"context": 2**32 - 1}),
        ("context_length_16m.gguf", {"context": 2**24}),
    ]:
        write(os.path.join("..", "regressions", "gguf"), name, gguf_bytes(llama(q8, **counts)))


if __name__ == "__main__":
    gguf_seeds()
    gguf_regressions()
    safetensors_seeds()
    peft_seeds()
