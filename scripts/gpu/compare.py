#!/usr/bin/env python3
"""Compares `qpai logits` output with reference logits (transformers / PEFT fixtures, or another
`qpai logits` run) and prints one Markdown table row; exits 1 when the tolerance is exceeded.

    compare.py LABEL OURS.json REFERENCE.json TOLERANCE [--reference-cases PATH]

REFERENCE.json: a `qpai logits` output, or a fixture whose cases sit at PATH (dot-separated keys,
e.g. models.qwen2-bf16.cases, or base_logits); each case has last_logits and may have
greedy_continuation_ids or greedy. Reported: the largest |ours - reference| over the whole
vocabulary, that relative to the largest |reference| logit, whether the top-1 ids agree, and
whether the greedy continuations agree.
"""

import json
import sys


def cases_at(doc, path):
    for key in path.split("."):
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    return doc


def main():
    label, ours_path, reference_path, tolerance = sys.argv[1:5]
    tolerance = float(tolerance)
    path = sys.argv[sys.argv.index("--reference-cases") + 1] if "--reference-cases" in sys.argv else "cases"
    ours = json.load(open(ours_path))["cases"]
    reference = cases_at(json.load(open(reference_path)), path)
    if "--rows" in sys.argv:
        rows = [int(r) for r in sys.argv[sys.argv.index("--rows") + 1].split(",")]
        reference = [reference[r] for r in rows]
    assert len(ours) == len(reference), (len(ours), len(reference))
    gap = scale = 0.0
    top1 = greedy = True
    for mine, want in zip(ours, reference):
        a, b = mine["last_logits"], want["last_logits"]
        assert len(a) == len(b)
        gap = max(gap, max(abs(x - y) for x, y in zip(a, b)))
        scale = max(scale, max(abs(y) for y in b))
        top1 &= max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)
        theirs = want.get("greedy_continuation_ids") or want.get("greedy")
        if theirs and mine.get("greedy"):
            greedy &= mine["greedy"][: len(theirs)] == theirs[: len(mine["greedy"])]
        else:
            greedy = None if greedy is True else greedy
    ok = gap <= tolerance
    print(f"| {label} | {gap:.2e} | {gap / max(scale, 1e-9):.2e} | {'yes' if top1 else 'no'} | "
          f"{'-' if greedy is None else ('yes' if greedy else 'no')} | {tolerance:g} | {'pass' if ok else 'FAIL'} |")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
