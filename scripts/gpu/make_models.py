#!/usr/bin/env python3
"""Test models for the GPU check (scripts/gpu/check.sh), built where it runs from configs alone.

    OUT/smollm2-shape/            SmolLM2-135M's shapes (30 layers, hidden 576, 9 heads, 3 KV
                                  heads, vocab 49152, tied embeddings) with random weights (seed 0),
                                  saved by transformers in bfloat16, with the tiny fixtures'
                                  tokenizer (its 512 ids are all the prompts use)
    OUT/smollm2-shape-f32.gguf    the same weights as GGUF, every tensor F32, and
    OUT/smollm2-shape-q8_0.gguf   projections Q8_0, both written by
                                  scripts/reference/make_tiny_gguf.py's converter
    OUT/smollm2-shape-logits.json transformers' reference: the checkpoint in float32 on the GPU,
                                  last-position logits of three prompts and 8 greedy tokens each
                                  (a full forward pass per token, no KV cache)
    OUT/bert-shape/               all-MiniLM-L6-v2's shapes (6 layers, hidden 384, 12 heads) with
                                  random weights and a small WordPiece vocabulary, and
    OUT/bert-shape-embeddings.json  transformers' mean-pooled, L2-normalised embeddings of
                                  EMBEDDING_TEXTS (as sentence-transformers computes them)

The same shapes read the same bytes per token as the real model, so they decode at its speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(REPO, "tests", "fixtures", "tiny", "llama-bf16")


def config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
        bos_token_id=1, eos_token_id=2)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in (7, 64, 300)]


EMBEDDING_TEXTS = ["the cat sits on the mat", "a bakery sells fresh bread every morning",
                   "opening hours are nine to five", "we answer questions about our products"]


def make_bert(out: str, device: str) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted({w for t in EMBEDDING_TEXTS for w in t.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + list("abcdefghijklmnopqrstuvwxyz")
    vocab = list(dict.fromkeys(vocab))
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    directory = os.path.join(out, "bert-shape")
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=384, num_hidden_layers=6,
                                     num_attention_heads=12, intermediate_size=1536,
                                     max_position_embeddings=512)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(directory, safe_serialization=True)
    model = model.to(device)
    embeddings = []
    with torch.no_grad():
        for text in EMBEDDING_TEXTS:
            ids = torch.tensor([tokenizer.encode(text).ids], device=device)
            hidden = model(input_ids=ids).last_hidden_state[0].float()
            pooled = hidden.mean(0)
            embeddings.append((pooled / pooled.norm()).cpu().tolist())
    with open(os.path.join(out, "bert-shape-embeddings.json"), "w") as f:
        json.dump({"texts": EMBEDDING_TEXTS, "embeddings": embeddings}, f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config()).to(torch.bfloat16)
    checkpoint = os.path.join(args.out, "smollm2-shape")
    model.save_pretrained(checkpoint, safe_serialization=True)
    # transformers 5 writes the rotary base under rope_parameters only; the
    # GGUF converter (and older readers) look for it at the top level.
    with open(os.path.join(checkpoint, "config.json")) as f:
        saved = json.load(f)
    saved.setdefault("rope_theta", (saved.get("rope_parameters") or {}).get("rope_theta", 100000.0))
    with open(os.path.join(checkpoint, "config.json"), "w") as f:
        json.dump(saved, f, indent=2)
    shutil.copy(os.path.join(TINY, "tokenizer_config.json"), checkpoint)
    # The tiny tokenizer's 512 tokens, and fillers up to the model's 49152 ids
    # (every id the model can sample must decode to text).
    with open(os.path.join(TINY, "tokenizer.json")) as f:
        tokenizer = json.load(f)
    vocab = tokenizer["model"]["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in tokenizer.get("added_tokens", [])}
    for i in range(config().vocab_size):
        if i not in taken:
            vocab[f"x{i}"] = i
    with open(os.path.join(checkpoint, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)

    sys.path.insert(0, os.path.join(REPO, "scripts", "reference"))
    import gguf
    import make_tiny_gguf

    make_tiny_gguf.BASE = checkpoint
    for name, file_type, weight_type in (
        ("f32", gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
        ("q8_0", gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    ):
        make_tiny_gguf.write_gguf(os.path.join(args.out, f"smollm2-shape-{name}.gguf"), file_type, weight_type)

    reference = model.float().to(device).eval()
    cases = []
    with torch.no_grad():
        for ids in prompts():
            sequence = list(ids)
            logits = reference(torch.tensor([sequence], device=device)).logits[0, -1]
            last = logits.float().cpu()
            greedy = []
            for _ in range(8):
                token = int(logits.argmax())
                greedy.append(token)
                sequence.append(token)
                logits = reference(torch.tensor([sequence], device=device)).logits[0, -1]
            cases.append({"ids": ids, "last_logits": [round(float(v), 6) for v in last],
                          "greedy_continuation_ids": greedy})
    with open(os.path.join(args.out, "smollm2-shape-logits.json"), "w") as f:
        json.dump({"device": device, "torch": torch.__version__,
                   "transformers": transformers.__version__, "cases": cases}, f)
    make_bert(args.out, device)
    print(f"models and reference logits in {args.out} ({device})")


if __name__ == "__main__":
    main()
