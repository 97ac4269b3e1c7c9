#!/usr/bin/env python3
"""Train the house-style LoRA adapter on SmolLM2-135M-Instruct with PEFT (CPU).

Base: the SmolLM2-135M-Instruct Q4_1 GGUF of qpai's catalog, de-quantized to float32 by
transformers. Data: data/house-style/train.jsonl (make_house_style_dataset.py). Each example
is rendered with the model's chat template (user = prompt, assistant = completion; no system
message, so the template's default one is used) and the loss is on the assistant tokens only
(the completion and its <|im_end|>). Examples longer than --max-len tokens are dropped, not cut.

LoRA: r=8, lora_alpha=16, dropout 0, bias "none", on q/k/v/o/gate/up/down_proj of all 30 layers.
AdamW (no weight decay), linear warm-up then cosine decay, batch 8, fixed seeds, 2 threads.

Writes models/adapters/house-style/{adapter_config.json, adapter_model.safetensors (bf16)} and
train_log.json beside them (loss per step, timings); the README.md there is written by hand and
kept as it is (update its numbers from train_log.json and check_house_style.py).

    /tmp/qpai-ref/venv-torch/bin/python scripts/lora/train_house_style.py --steps 40
    /tmp/qpai-ref/venv-torch/bin/python scripts/lora/train_house_style.py --measure 3   # time 3 steps only
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import os
import platform
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from house_style_common import ADAPTER, GGUF_FILE, GGUF_SHA256, load_base, load_jsonl, prompt_ids  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def encode(tok, record: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are -100 except on the assistant's completion + <|im_end|>."""
    messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    full = list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    head = prompt_ids(tok, record["prompt"])
    assert full[: len(head)] == head, record["id"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    # The template closes the turn with "<|im_end|>\n": learn up to <|im_end|>, not the newline.
    last = len(full) - 1 - full[::-1].index(end)
    full = full[: last + 1]
    labels = [-100] * len(head) + full[len(head):]
    return full, labels


def batches(examples: list, batch_size: int, rng: random.Random):
    """One epoch: shuffled, then grouped by length inside windows of 8 batches (less padding)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 8
    out = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i:i + window], key=lambda j: len(examples[j][0]))
        out += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size) if len(chunk[k:k + batch_size]) == batch_size]
    rng.shuffle(out)
    return out


def collate(examples, idx, pad_id):
    n = max(len(examples[j][0]) for j in idx)
    ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), n), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), n), dtype=torch.long)
    for row, j in enumerate(idx):
        x, y = examples[j]
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return ids, labels, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=30.0,
                        help="stop early (and save) once training has run this long")
    parser.add_argument("--measure", type=int, default=0, help="only time this many steps; save nothing")
    parser.add_argument("--out", default=ADAPTER)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()

    from peft import LoraConfig, get_peft_model

    model, tok = load_base(attn="sdpa")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    records = load_jsonl("train")
    examples = []
    dropped = 0
    for r in records:
        x, y = encode(tok, r)
        if len(x) > args.max_len:
            dropped += 1
            continue
        examples.append((x, y))
    n_tokens = sum(len(x) for x, _ in examples)
    n_target = sum(sum(1 for t in y if t != -100) for _, y in examples)
    print(f"[data] {len(examples)} train examples (dropped {dropped} over {args.max_len} tokens); "
          f"mean {n_tokens / len(examples):.0f} tokens, {n_target / len(examples):.0f} of them in the loss", flush=True)

    config = LoraConfig(task_type="CAUSAL_LM", r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, bias="none",
                        target_modules=TARGETS, use_dora=False, use_rslora=False)
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"[lora] trainable parameters: {trainable}", flush=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    steps = args.measure or args.steps

    def lr_at(step):  # step is 0-based
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, steps - args.warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))

    rng = random.Random(args.seed)
    plan = []
    while len(plan) < steps:
        plan += batches(examples, args.batch, rng)
    plan = plan[:steps]
    load_s = time.time() - t0
    print(f"[setup] {load_s:.1f}s; {steps} steps of {args.batch} = {steps * args.batch} examples "
          f"({steps * args.batch / len(examples):.2f} epochs)", flush=True)

    log = []
    t_train = time.time()
    for step, idx in enumerate(plan):
        ts = time.time()
        ids, labels, mask = collate(examples, idx, pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - ts
        log.append({"step": step + 1, "loss": round(out.loss.item(), 5), "lr": lr_at(step),
                    "grad_norm": round(grad_norm, 4), "tokens": int(mask.sum()), "seconds": round(dt, 2)})
        elapsed = time.time() - t_train
        eta = elapsed / (step + 1) * (steps - step - 1)
        print(f"[step {step + 1}/{steps}] loss {float(out.loss):.4f} lr {lr_at(step):.2e} "
              f"gnorm {grad_norm:.3f} tokens {int(mask.sum())} {dt:.1f}s (eta {eta / 60:.1f} min)", flush=True)
        if elapsed > args.max_minutes * 60 and step + 1 < steps:
            print(f"[stop] {elapsed / 60:.1f} min > --max-minutes {args.max_minutes}: stopping after step {step + 1}",
                  flush=True)
            break
    train_s = time.time() - t_train
    planned, steps = steps, len(log)
    if args.measure:
        print(f"[measure] {train_s / steps:.1f}s per step")
        return

    # Save: PEFT's files, the factors as bf16, and no generic model card.
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    # save_pretrained writes (or edits) README.md as a generic model card: keep the hand-written one.
    card = os.path.join(args.out, "README.md")
    kept_card = open(card, encoding="utf-8").read() if os.path.exists(card) else None
    model.save_pretrained(args.out)
    if os.path.exists(card):
        os.remove(card)
    if kept_card is not None:
        with open(card, "w", encoding="utf-8") as f:
            f.write(kept_card)
    from safetensors.torch import load_file, save_file

    weights = os.path.join(args.out, "adapter_model.safetensors")
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in sorted(load_file(weights).items())}
    save_file(tensors, weights, metadata={"format": "pt"})
    os.chmod(weights, 0o644)
    config_path = os.path.join(args.out, "adapter_config.json")
    with open(config_path) as f:
        saved = json.load(f)
    saved["base_model_name_or_path"] = "smollm2-135m-instruct"
    saved["target_modules"] = sorted(saved["target_modules"])  # PEFT writes a set, in any order
    assert saved["modules_to_save"] is None and saved["use_dora"] is False and saved["bias"] == "none"
    with open(config_path, "w") as f:
        json.dump(saved, f, indent=2, sort_keys=True)
        f.write("\n")

    def mean(xs):
        return sum(xs) / len(xs)

    losses = [e["loss"] for e in log]
    chunk = max(1, steps // 10)
    curve = [{"steps": f"{i + 1}-{min(i + chunk, steps)}", "mean_loss": round(mean(losses[i:i + chunk]), 4)}
             for i in range(0, steps, chunk)]
    summary = {
        "base": {"file": GGUF_FILE, "sha256": GGUF_SHA256, "loaded_as": "transformers gguf_file, de-quantized to float32"},
        "data": "data/house-style/train.jsonl",
        "train_examples": len(examples),
        "dropped_over_max_len": dropped,
        "hyperparameters": {"r": args.r, "lora_alpha": args.alpha, "lora_dropout": 0.0, "bias": "none",
                            "target_modules": TARGETS, "optimizer": "AdamW(betas=(0.9, 0.999), weight_decay=0)",
                            "lr": args.lr, "schedule": f"linear warm-up {args.warmup} steps, cosine to 0",
                            "steps": steps, "planned_steps": planned, "batch": args.batch, "examples_seen": steps * args.batch,
                            "max_len": args.max_len, "grad_clip": 1.0, "seed": args.seed,
                            "loss": "mean token cross-entropy on the assistant tokens (completion + <|im_end|>)",
                            "saved_dtype": "bfloat16 (trained in float32)"},
        "machine": {"threads": args.threads, "cpu": platform.processor() or platform.machine(),
                    "note": "2 shared cores, a compiler running beside"},
        "seconds": {"setup": round(load_s, 1), "train": round(train_s, 1), "per_step_mean": round(train_s / steps, 2)},
        "loss": {"first": losses[0], "last": losses[-1], "mean_last_10": round(mean(losses[-10:]), 4), "curve": curve},
        "versions": {p: md.version(p) for p in ("torch", "transformers", "peft", "gguf", "safetensors")},
        "python": platform.python_version(),
        "steps_log": log,
    }
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    print(f"[done] train {train_s / 60:.1f} min, {train_s / steps:.1f}s/step; loss {losses[0]:.3f} -> "
          f"{mean(losses[-10:]):.3f} (mean of last 10); saved to {args.out}", flush=True)


if __name__ == "__main__":
    main()
