#!/usr/bin/env python3
"""Tiny random Hugging Face checkpoints + transformers reference logits, for qpai's loader tests.

No real model available offline covers every safetensors architecture/dtype qpai loads, so this
script builds three tiny RANDOM checkpoints (2 layers, hidden 64, vocab 512; ~300 KB each) and
records what transformers computes with them:

    tests/fixtures/tiny/qwen2-bf16/    Qwen2ForCausalLM,   bfloat16, untied lm_head, q/k/v biases
    tests/fixtures/tiny/mistral-f16/   MistralForCausalLM, float16,  untied lm_head, no sliding window
    tests/fixtures/tiny/llama-bf16/    LlamaForCausalLM,   bfloat16, tied lm_head (tie_word_embeddings)
    tests/fixtures/tiny/logits.json    reference logits (see below)

Each directory holds config.json, model.safetensors (written by save_pretrained in the
checkpoint's dtype), generation_config.json, tokenizer.json (a byte-level BPE tokenizer with
exactly 512 tokens, loadable by the Rust `tokenizers` crate 0.23) and tokenizer_config.json
(bos_token, eos_token and a ChatML-like chat_template).

logits.json: for each model and three fixed prompts (token ids, lengths 5, 17 and 40) the
checkpoint is loaded with transformers and upcast with `.float()` (the stored bf16/f16 weights in
f32 arithmetic, as qpai computes on CPU), and for the LAST position it records the full logits
(rounded to 5 decimals), the top-10 ids and logits, and 8 greedy continuation ids (each step a
full forward pass over the whole sequence, no KV cache), plus the top-1/top-2 margin of each
greedy step (how robust the greedy ids are to small numeric differences).

How to run (CPU only, ~1 minute on 2 cores; uses the same venv as make_fixtures.py):

    python3 -m venv /tmp/qpai-ref/venv-torch
    /tmp/qpai-ref/venv-torch/bin/pip install -r scripts/reference/requirements-torch.txt
    /tmp/qpai-ref/venv-torch/bin/python scripts/reference/make_tiny_checkpoints.py

Options: --out DIR (default tests/fixtures/tiny), --check (only reload the existing directories
and compare with the existing logits.json; writes nothing). Every run ends with that check: each
directory is reloaded from disk with AutoModelForCausalLM.from_pretrained(dir).float() and must
reproduce logits.json exactly, and tokenizer.json must load with tokenizers.Tokenizer.from_file
and have 512 tokens. The output is deterministic (fixed seeds) for a given torch/transformers.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
BOS_ID, EOS_ID = 0, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)

# name -> (config class, model class, dtype, extra config, seed)
MODELS = {
    "qwen2-bf16": (
        Qwen2Config,
        Qwen2ForCausalLM,
        torch.bfloat16,
        dict(tie_word_embeddings=False, use_sliding_window=False, sliding_window=None),
        1001,
    ),
    "mistral-f16": (
        MistralConfig,
        MistralForCausalLM,
        torch.float16,
        dict(tie_word_embeddings=False, sliding_window=None),
        1002,
    ),
    "llama-bf16": (
        LlamaConfig,
        LlamaForCausalLM,
        torch.bfloat16,
        dict(tie_word_embeddings=True, attention_bias=False, mlp_bias=False),
        1003,
    ),
}

WEIGHT_STD = 0.05  # every linear weight and bias
LM_HEAD_STD = 0.25  # lm_head / (tied) embedding: gives last-position logits a spread of a few units
NORM_JITTER = 0.1  # RMSNorm weights are 1 + N(0, 0.1) so a loader that ignores them is caught
# With tied embeddings the last token's own embedding in the residual stream makes a random model
# predict that token again and again (logit ~ sum_i g_i * e_i^2 > 0). So the tied model gets small
# embeddings and a final norm weight with random signs (and a larger scale), which cancels that.
TIED_EMBED_STD = 0.05
TIED_FINAL_NORM_SCALE = 5.0

TOP_K = 10
GREEDY_STEPS = 8
PROMPT_LENGTHS = [5, 17, 40]
PROMPT_SEED = 7


def prompts() -> list[list[int]]:
    """Fixed prompts: ids 3..511 (no special tokens), the first starts with BOS."""
    gen = torch.Generator().manual_seed(PROMPT_SEED)
    out = []
    for n in PROMPT_LENGTHS:
        ids = torch.randint(3, VOCAB_SIZE, (n,), generator=gen).tolist()
        out.append(ids)
    out[0][0] = BOS_ID
    return out


# --------------------------------------------------------------------------------------- tokenizer


def corpus() -> list[str]:
    """A fixed, generated English-like corpus for training the BPE merges."""
    words = (
        "the of and to in is was for on that with as by at from it an be this are which or "
        "model token weight layer attention head query key value hidden state logits vocab "
        "server request response stream batch cache prefill decode sample greedy rope norm "
        "hello world qpai candle rust python tensor float half brain bfloat sixteen thirty two "
        "mistral llama qwen gemma small tiny random check load save file json config test"
    ).split()
    gen = torch.Generator().manual_seed(11)
    lines = []
    for _ in range(400):
        n = int(torch.randint(4, 16, (1,), generator=gen))
        idx = torch.randint(0, len(words), (n,), generator=gen).tolist()
        num = int(torch.randint(0, 1000, (1,), generator=gen))
        lines.append(" ".join(words[i] for i in idx) + f" {num}.")
    return lines


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size(True)} tokens, want {VOCAB_SIZE}")
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise SystemExit(f"special token {t} is not id {i}")
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": BOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


# --------------------------------------------------------------------------------------- models


def build_model(name: str) -> torch.nn.Module:
    config_cls, model_cls, dtype, extra, seed = MODELS[name]
    config = config_cls(**COMMON, **extra)
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + NORM_JITTER * torch.randn_like(p))
                if pname == "model.norm.weight" and config.tie_word_embeddings:
                    signs = torch.randint(0, 2, p.shape).float() * 2.0 - 1.0
                    p.mul_(TIED_FINAL_NORM_SCALE * signs)
            elif pname in ("model.embed_tokens.weight", "lm_head.weight"):
                p.normal_(0.0, TIED_EMBED_STD if config.tie_word_embeddings else LM_HEAD_STD)
            else:  # linear weights and (qwen2) q/k/v biases
                p.normal_(0.0, WEIGHT_STD)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.config.dtype = dtype
    return model.to(dtype)


def write_checkpoint(name: str, out_dir: str, tok: Tokenizer) -> None:
    model = build_model(name)
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):  # a clean directory: only what this run writes
        os.remove(os.path.join(d, f))
    model.save_pretrained(d, safe_serialization=True)
    # transformers 5 writes "dtype"; older readers (and candle's configs) look for "torch_dtype",
    # and rope_theta may only be inside "rope_parameters". Add the legacy top-level keys.
    cfg_path = os.path.join(d, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.setdefault("torch_dtype", str(MODELS[name][2]).removeprefix("torch."))
    cfg.setdefault("rope_theta", COMMON["rope_theta"])
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(), f, indent=2)
        f.write("\n")


def load_f32(d: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager")
    return model.float().eval()


@torch.no_grad()
def last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1].float()


@torch.no_grad()
def reference_case(model: torch.nn.Module, ids: list[int]) -> dict:
    logits = last_logits(model, ids)
    top = torch.topk(logits, TOP_K)
    seq = list(ids)
    cont, margins = [], []
    for _ in range(GREEDY_STEPS):
        step = last_logits(model, seq)  # full forward pass over the whole sequence, no cache
        t2 = torch.topk(step, 2)
        nxt = int(t2.indices[0])
        margins.append(round(float(t2.values[0] - t2.values[1]), 5))
        cont.append(nxt)
        seq.append(nxt)
    return {
        "ids": list(ids),
        "last_logits": [round(float(x), 5) for x in logits],
        "top_ids": [int(i) for i in top.indices],
        "top_logits": [round(float(x), 5) for x in top.values],
        "greedy_continuation_ids": cont,
        "greedy_top2_margins": margins,
    }


def model_reference(name: str, d: str) -> dict:
    model = load_f32(d)
    stored = {str(p.dtype).removeprefix("torch.") for p in _stored_tensors(d).values()}
    return {
        "architecture": model.config.architectures[0],
        "dtype": stored.pop() if len(stored) == 1 else sorted(stored),
        "cases": [reference_case(model, ids) for ids in prompts()],
    }


def _stored_tensors(d: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(d, "model.safetensors"))


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "safetensors", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------------------- check


def check(out_dir: str) -> dict:
    """Reload every directory from disk and compare with logits.json; returns a summary."""
    with open(os.path.join(out_dir, "logits.json")) as f:
        ref = json.load(f)
    summary = {}
    for name, entry in ref["models"].items():
        d = os.path.join(out_dir, name)
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        n_tok = tok.get_vocab_size(with_added_tokens=True)
        assert n_tok == VOCAB_SIZE, f"{name}: tokenizer has {n_tok} tokens"
        with open(os.path.join(d, "tokenizer_config.json")) as f:
            tc = json.load(f)
        for key in ("bos_token", "eos_token"):
            assert tok.token_to_id(tc[key]) is not None, f"{name}: {key} not in vocab"
        got = model_reference(name, d)
        assert got["architecture"] == entry["architecture"], name
        assert got["dtype"] == entry["dtype"], name
        assert got["cases"] == entry["cases"], f"{name}: reloaded logits differ from logits.json"
        max_abs = max(max(abs(x) for x in c["last_logits"]) for c in got["cases"])
        std = [float(torch.tensor(c["last_logits"]).std()) for c in got["cases"]]
        min_margin = min(min(c["greedy_top2_margins"]) for c in got["cases"])
        files = {f: os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d))}
        summary[name] = {
            "max_abs_logit": max_abs,
            "last_logit_std": [round(s, 3) for s in std],
            "min_greedy_margin": min_margin,
            "tokens": n_tok,
            "files": files,
            "dir_bytes": sum(files.values()),
        }
        assert summary[name]["dir_bytes"] < 1_500_000, f"{name}: directory too large"
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures", "tiny"))
    ap.add_argument("--check", action="store_true", help="only verify the existing outputs")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    if not args.check:
        os.makedirs(args.out, exist_ok=True)
        tok = build_tokenizer()
        result = {"versions": versions(), "models": {}}
        for name in MODELS:
            write_checkpoint(name, args.out, tok)
            result["models"][name] = model_reference(name, os.path.join(args.out, name))
        with open(os.path.join(args.out, "logits.json"), "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    summary = check(args.out)
    json.dump(summary, sys.stdout, indent=2)
    print("\nok: every checkpoint reloads and reproduces logits.json exactly")


if __name__ == "__main__":
    main()
