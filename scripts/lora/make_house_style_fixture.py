#!/usr/bin/env python3
"""Reference logits of SmolLM2-135M-Instruct with and without the house-style adapter.

Writes tests/fixtures/lora/logits_smollm2_house_style.json: for the 3 heldout prompts with the
fewest tokens (data/house-style/heldout.jsonl), rendered with the chat template
(add_generation_prompt=True, no system message: the template's default one), the token ids and
the last position's top-20 ids and logits (5 decimals) of
    base      the Q4_1 GGUF de-quantized to float32 by transformers (eager attention), and
    adapter   base + models/adapters/house-style applied unmerged by PEFT (PeftModel.from_pretrained),
one full forward pass over the prompt, no KV cache; plus 8 greedy steps of each (a fresh full
forward pass per step) and the largest |adapter - base| over the full last-position logits.

    /tmp/qpai-ref/venv-torch/bin/python scripts/lora/make_house_style_fixture.py
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from house_style_common import (  # noqa: E402
    ADAPTER, GGUF_FILE, GGUF_SHA256, ROOT, load_base, load_jsonl, prompt_ids, sha256_file,
)

TOP_K = 20
GREEDY_STEPS = 8
OUT = os.path.join(ROOT, "tests", "fixtures", "lora", "logits_smollm2_house_style.json")


def last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


def greedy(model, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    out = []
    for _ in range(steps):
        nxt = int(torch.argmax(last_logits(model, ids)))
        out.append(nxt)
        ids.append(nxt)
    return out


def case(model, tok, ids):
    logits = last_logits(model, ids)
    top = torch.topk(logits, TOP_K)
    cont = greedy(model, ids, GREEDY_STEPS)
    return logits, {
        "top_ids": [int(i) for i in top.indices],
        "top_logits": [round(float(x), 5) for x in top.values],
        "greedy_continuation_ids": cont,
        "greedy_continuation_text": tok.decode(cont),
    }


def main() -> None:
    torch.set_num_threads(2)
    from peft import PeftModel

    model, tok = load_base(attn="eager")
    heldout = load_jsonl("heldout")
    rendered = sorted(((len(prompt_ids(tok, r["prompt"])), r["id"], r) for r in heldout), key=lambda t: t[:2])[:3]
    cases = []
    base_full = []
    for _, _, r in rendered:
        ids = prompt_ids(tok, r["prompt"])
        logits, base = case(model, tok, ids)
        base_full.append(logits)
        cases.append({"id": r["id"], "prompt": r["prompt"], "ids": ids, "n_tokens": len(ids), "base": base})
        print(f"{r['id']}: {len(ids)} tokens, base greedy {base['greedy_continuation_text']!r}", flush=True)

    model = PeftModel.from_pretrained(model, ADAPTER)
    model.eval()
    for c, b in zip(cases, base_full):
        logits, adapted = case(model, tok, c["ids"])
        c["adapter"] = adapted
        c["adapter_max_abs_change"] = round(float((logits - b).abs().max()), 5)
        print(f"{c['id']}: adapter greedy {adapted['greedy_continuation_text']!r}, "
              f"max |change| {c['adapter_max_abs_change']}", flush=True)

    with open(os.path.join(ADAPTER, "adapter_config.json")) as f:
        adapter_config = json.load(f)
    out = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF) + models/adapters/house-style (PEFT LoRA)",
        "generated_by": "scripts/lora/make_house_style_fixture.py",
        "reference": "transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32, "
                     "attn_implementation='eager'): GGUF de-quantized to float32; the adapter applied unmerged "
                     "by peft PeftModel.from_pretrained (factors stored bf16, computed in float32). One forward "
                     "pass over the whole prompt, no KV cache; logits of the last position. "
                     f"greedy_continuation_ids: {GREEDY_STEPS} argmax steps, each a fresh full forward pass.",
        "source": {"file": GGUF_FILE, "sha256": GGUF_SHA256},
        "adapter": {
            "dir": "models/adapters/house-style",
            "adapter_model_sha256": sha256_file(os.path.join(ADAPTER, "adapter_model.safetensors")),
            "r": adapter_config["r"],
            "lora_alpha": adapter_config["lora_alpha"],
            "target_modules": sorted(adapter_config["target_modules"]),
        },
        "chat_template": "the GGUF's tokenizer.chat_template, user message only, add_generation_prompt=True "
                         "(the template adds SmolLM2's default system message)",
        "versions": {"python": platform.python_version(),
                     **{p: md.version(p) for p in ("torch", "transformers", "peft", "tokenizers", "gguf",
                                                   "safetensors", "numpy", "jinja2")}},
        "torch_threads": 2,
        "top_k": TOP_K,
        "cases": cases,
    }
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
