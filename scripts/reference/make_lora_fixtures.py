#!/usr/bin/env python3
"""PEFT LoRA adapters on the tiny Llama checkpoint + reference logits, for qpai's LoRA tests.

Base: tests/fixtures/tiny/llama-bf16 (made by make_tiny_checkpoints.py; 2 layers, hidden 64,
vocab 512), loaded with transformers and upcast to float32. Two adapters are built with PEFT
with random (non-zero) factors, `init_lora_weights=False`, fixed seeds:

    tests/fixtures/lora/r4-all/     r=4, lora_alpha=8, on all seven projections
                                    (q, k, v, o, gate, up, down)
    tests/fixtures/lora/r8-rslora/  r=8, lora_alpha=16, use_rslora, on q_proj, v_proj and down_proj

Each is saved with save_pretrained (adapter_config.json + adapter_model.safetensors, f32).
tests/fixtures/lora/logits.json records, for the three prompts of tests/fixtures/tiny/logits.json,
the last position's full logits (5 decimals) and top-10 ids of: the base; each adapter applied
unmerged by PEFT; and each adapter merged by PEFT (merge_and_unload), with the largest
|merged - unmerged| difference (PEFT's own merge error).

How to run (CPU, seconds; the venv of make_fixtures.py plus peft):

    /tmp/qpai-ref/venv-torch/bin/pip install peft==0.19.1
    /tmp/qpai-ref/venv-torch/bin/python scripts/reference/make_lora_fixtures.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = os.path.join(ROOT, "tests/fixtures/tiny/llama-bf16")
ADAPTERS = {
    "r4-all": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"]),
    "r8-rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
}


def base_model():
    model = transformers.AutoModelForCausalLM.from_pretrained(BASE).float()
    model.eval()
    return model


def last_logits(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    top = torch.topk(logits, 10)
    return {
        "last_logits": [round(float(x), 5) for x in logits],
        "top_ids": [int(i) for i in top.indices],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/lora"))
    args = parser.parse_args()
    with open(os.path.join(ROOT, "tests/fixtures/tiny/logits.json")) as f:
        prompts = [c["ids"] for c in json.load(f)["models"]["llama-bf16"]["cases"]]
    out = {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "base": "tests/fixtures/tiny/llama-bf16",
        "prompts": prompts,
        "base_logits": [last_logits(base_model(), ids) for ids in prompts],
        "adapters": {},
    }
    for seed, (name, settings) in enumerate(ADAPTERS.items()):
        torch.manual_seed(1000 + seed)
        config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, lora_dropout=0.0, **settings)
        model = get_peft_model(base_model(), config)
        model.eval()
        directory = os.path.join(args.out, name)
        model.save_pretrained(directory)
        # PEFT also writes a generic model card; the fixture is the adapter alone,
        # naming its base by its path in the repository.
        os.remove(os.path.join(directory, "README.md"))
        config_path = os.path.join(directory, "adapter_config.json")
        with open(config_path) as f:
            saved = json.load(f)
        saved["base_model_name_or_path"] = "tests/fixtures/tiny/llama-bf16"
        with open(config_path, "w") as f:
            json.dump(saved, f, indent=2, sort_keys=True)
        unmerged = [last_logits(model, ids) for ids in prompts]
        merged_model = model.merge_and_unload()
        merged = [last_logits(merged_model, ids) for ids in prompts]
        gap = max(abs(a - b) for u, m in zip(unmerged, merged)
                  for a, b in zip(u["last_logits"], m["last_logits"]))
        base_gap = max(abs(a - b) for u, b0 in zip(unmerged, out["base_logits"])
                       for a, b in zip(u["last_logits"], b0["last_logits"]))
        out["adapters"][name] = {"settings": settings, "unmerged": unmerged, "merged": merged,
                                 "max_merge_gap": gap, "max_change_from_base": base_gap}
        print(f"{name}: saved to {directory}; merged vs unmerged max gap {gap:.2e}; "
              f"change from base {base_gap:.3f}")
    with open(os.path.join(args.out, "logits.json"), "w") as f:
        json.dump(out, f)
    print(f"wrote {os.path.join(args.out, 'logits.json')}")


if __name__ == "__main__":
    main()
