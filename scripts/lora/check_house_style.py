#!/usr/bin/env python3
"""Format adherence of SmolLM2-135M-Instruct with and without the house-style adapter.

Greedy generation (max 120 new tokens, stops at <|im_end|>) on the first N heldout prompts
(data/house-style/heldout.jsonl, in file order), once with the base (the GGUF de-quantized to
f32) and once with base + adapter applied unmerged by PEFT (PeftModel.from_pretrained on
models/adapters/house-style). A reply adheres when the house-style regex matches all of it
(trailing whitespace removed); see data/house-style/README.md.

--prompt plain (default): the dataset's prompt as is; it names the package, summary, section
and facts but says nothing of the format.
--prompt described: the same prompt followed by a description of the format in words, for
both models (a fairer test of the base).

Also counted: the heading names the right package, the Category line is the expected one, and
the reply equals the reference completion exactly.

    /tmp/qpai-ref/venv-torch/bin/python scripts/lora/check_house_style.py [--n 30] [--prompt plain]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from house_style_common import ADAPTER, adheres, load_base, load_jsonl, prompt_messages  # noqa: E402

DESCRIBED = (
    "\n\nFormat: first line '## ' and the package name; a blank line; a line '> ' and the summary as a "
    "sentence (capital first letter, ending with a period); a blank line; exactly three lines '- ' each "
    "with one sentence from the facts ending with a period; a blank line; a last line 'Category: ' and "
    "the section's human name (for example devel is Development, libs is Libraries, python is Python). "
    "Nothing else."
)


def generate(model, tok, prompts: list[str], max_new: int, batch: int) -> list[str]:
    end = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else end
    outs = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        rendered = [tok.apply_chat_template(prompt_messages(p), tokenize=True, add_generation_prompt=True,
                                            return_dict=True)["input_ids"] for p in chunk]
        n = max(len(r) for r in rendered)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for row, r in enumerate(rendered):  # left padding
            ids[row, n - len(r):] = torch.tensor(list(r))
            mask[row, n - len(r):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=end, pad_token_id=pad)
        for row in gen[:, n:]:
            row = row.tolist()
            if end in row:
                row = row[: row.index(end)]
            outs.append(tok.decode(row, skip_special_tokens=False))
        print(f"  {len(outs)}/{len(prompts)}", flush=True)
    return outs


def score(records, replies):
    rows = []
    for r, reply in zip(records, replies):
        lines = reply.rstrip().split("\n")
        expected_category = r["completion"].split("\n")[-1]
        rows.append({
            "id": r["id"],
            "adheres": adheres(reply),
            "heading_ok": bool(lines) and lines[0] == f"## {r['id']}",
            "category_ok": bool(lines) and lines[-1] == expected_category,
            "exact": reply.rstrip() == r["completion"],
            "reply": reply,
        })
    n = len(rows)
    summary = {k: sum(x[k] for x in rows) / n for k in ("adheres", "heading_ok", "category_ok", "exact")}
    return summary, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--max-new", type=int, default=120)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--prompt", choices=["plain", "described"], default="plain")
    parser.add_argument("--adapter", default=ADAPTER)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the replies and scores here (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from peft import PeftModel

    records = load_jsonl("heldout")[: args.n]
    prompts = [r["prompt"] + (DESCRIBED if args.prompt == "described" else "") for r in records]
    model, tok = load_base(attn="sdpa")
    results = {"prompt": args.prompt, "n": len(records), "max_new_tokens": args.max_new, "greedy": True}
    t = time.time()
    print("[base] generating", flush=True)
    base_summary, base_rows = score(records, generate(model, tok, prompts, args.max_new, args.batch))
    results["base"] = {"summary": base_summary, "seconds": round(time.time() - t, 1), "rows": base_rows}
    print(f"[base] {base_summary}", flush=True)

    model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    t = time.time()
    print("[adapter] generating", flush=True)
    lora_summary, lora_rows = score(records, generate(model, tok, prompts, args.max_new, args.batch))
    results["adapter"] = {"summary": lora_summary, "seconds": round(time.time() - t, 1), "rows": lora_rows}
    print(f"[adapter] {lora_summary}", flush=True)

    for name in ("base", "adapter"):
        print(f"\n--- {name}, {records[0]['id']} ---\n{results[name]['rows'][0]['reply']}")
    print(f"\nformat adherence ({args.prompt} prompt, n={len(records)}): base {base_summary['adheres']:.0%}, "
          f"adapter {lora_summary['adheres']:.0%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
