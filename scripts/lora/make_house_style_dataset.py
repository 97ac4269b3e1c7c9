#!/usr/bin/env python3
"""Build the "house style" product-description dataset (data/house-style/{train,heldout}.jsonl).

Source: Debian 12 (bookworm) main, amd64, as apt fetches it: the Packages index (Package,
Section, short Description, Description-md5) joined with the English translation index
Translation-en (Description-en: short + long description, keyed by Package + Description-md5).
Debian's Packages files carry only the short description; the long one lives in Translation-en.

Each record is {"id", "prompt", "completion"}:

    prompt      Write the product description for <Package>.
                Summary: <Debian short description, verbatim>
                Section: <Debian section>
                Facts: <long description, one line, whole sentences, at most 60 words>

    completion  ## <Package>
                                                              (blank)
                > <short description, first letter capitalised, ending with a period>
                                                              (blank)
                - <sentence 1>
                - <sentence 2>
                - <sentence 3>
                                                              (blank)
                Category: <section mapped to a human name, see SECTION_NAMES>

The three bullets are the first three sentences of the long description that end with a
period and have 4..25 words. Everything is mechanical: no model is involved.

The format checker (FORMAT_RE, applied to the text with trailing whitespace removed) is
documented in data/house-style/README.md; qpai re-implements it in Rust.

Selection (deterministic, no randomness): packages whose long description is ASCII, has at
least three sentences, has no verbatim/bullet/list lines, and yields three bullets inside the
Facts budget and a completion of at most MAX_COMPLETION_CHARS characters;
-dev/-doc/-dbg/-data/-common style packages are skipped (boilerplate text), and a long
description (or first bullet) shared by several packages is kept once (the package whose name
sorts first). Split by package name: heldout when
int(sha256("house-style/" + name)[:8], 16) % 1000 < 120, else train; within each split the
packages are ordered by that hash, at most MAX_PER_SECTION_SHARE of a split comes from one
section, and the first N_TRAIN / N_HELDOUT are written.

Usage:
    # fetch the indexes into a private apt state directory (the image disables Translation-en)
    mkdir -p /tmp/hs-apt/lists/partial /tmp/hs-apt/cache/archives/partial
    echo 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main' \
        > /tmp/hs-apt/sources.list
    apt-get update -o Acquire::Languages=en -o Dir::State::Lists=/tmp/hs-apt/lists \
        -o Dir::Cache=/tmp/hs-apt/cache -o Dir::Etc::SourceList=/tmp/hs-apt/sources.list \
        -o Dir::Etc::SourceParts=- -o APT::Update::Post-Invoke-Success::=
    python3 scripts/lora/make_house_style_dataset.py --lists /tmp/hs-apt/lists

Python standard library only (+ the `lz4` command line tool, or python-lz4, for .lz4 lists).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "data", "house-style")

N_TRAIN = 1500
N_HELDOUT = 200
HELDOUT_PER_MILLE = 120
MAX_PER_SECTION_SHARE = 0.05
FACTS_MAX_WORDS = 60
# Keeps a reply (+ <|im_end|>) under ~110 SmolLM2 tokens, inside a 120-token generation budget.
MAX_COMPLETION_CHARS = 400
BULLET_MIN_WORDS = 4
BULLET_MAX_WORDS = 25

# Debian sections (bookworm main) -> the human name on the "Category:" line.
SECTION_NAMES = {
    "admin": "Administration",
    "cli-mono": "Mono and .NET",
    "comm": "Communication",
    "database": "Databases",
    "devel": "Development",
    "doc": "Documentation",
    "editors": "Editors",
    "education": "Education",
    "electronics": "Electronics",
    "embedded": "Embedded",
    "fonts": "Fonts",
    "games": "Games",
    "gnome": "GNOME",
    "gnu-r": "GNU R",
    "gnustep": "GNUstep",
    "golang": "Go",
    "graphics": "Graphics",
    "hamradio": "Amateur Radio",
    "haskell": "Haskell",
    "httpd": "Web Servers",
    "interpreters": "Interpreters",
    "introspection": "GObject Introspection",
    "java": "Java",
    "javascript": "JavaScript",
    "kde": "KDE",
    "kernel": "Kernel",
    "libdevel": "Library Development",
    "libs": "Libraries",
    "lisp": "Lisp",
    "localization": "Localization",
    "mail": "Email",
    "math": "Mathematics",
    "misc": "Miscellaneous",
    "net": "Networking",
    "news": "News",
    "ocaml": "OCaml",
    "otherosfs": "Other OS and File Systems",
    "perl": "Perl",
    "php": "PHP",
    "python": "Python",
    "ruby": "Ruby",
    "rust": "Rust",
    "science": "Science",
    "shells": "Shells",
    "sound": "Sound",
    "tex": "TeX",
    "text": "Text Processing",
    "utils": "Utilities",
    "vcs": "Version Control",
    "video": "Video",
    "web": "Web",
    "x11": "X Window System",
    "xfce": "Xfce",
    "zope": "Zope",
}
# Not product-like: debug symbols, tasks, metapackages, transitional old libraries.
SKIP_SECTIONS = {"debug", "tasks", "metapackages", "oldlibs"}
SKIP_SUFFIXES = ("-dev", "-doc", "-dbg", "-dbgsym", "-data", "-common", "-examples", "-tests", "-l10n")

# Names hold letters, spaces and "." only; only "." is escaped, so the pattern reads the same
# in Python's re and Rust's regex.
assert all(re.fullmatch(r"[A-Za-z .]+", n) for n in SECTION_NAMES.values())
_CATEGORY_ALT = "|".join(n.replace(".", r"\.") for n in sorted(set(SECTION_NAMES.values())))
# The whole completion (trailing whitespace removed) must match this, start to end.
FORMAT_RE = re.compile(
    r"## \S[^\n]*\n"
    r"\n"
    r"> [A-Z][^\n]*\.\n"
    r"\n"
    r"- \S[^\n]*\.\n"
    r"- \S[^\n]*\.\n"
    r"- \S[^\n]*\.\n"
    r"\n"
    r"Category: (?:" + _CATEGORY_ALT + r")"
)


def adheres(completion: str) -> bool:
    """The house-style format check: trailing whitespace removed, the whole text matches."""
    return FORMAT_RE.fullmatch(completion.rstrip(" \t\r\n")) is not None


# --------------------------------------------------------------------------------------------
# Reading apt's lists


def read_list(path: str) -> str:
    if path.endswith(".lz4"):
        try:
            import lz4.frame  # type: ignore

            with open(path, "rb") as f:
                return lz4.frame.decompress(f.read()).decode("utf-8")
        except ImportError:
            if not shutil.which("lz4"):
                sys.exit("need the lz4 command (apt-get install lz4) or python-lz4 to read " + path)
            return subprocess.run(["lz4", "-dc", path], check=True, capture_output=True).stdout.decode("utf-8")
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read().decode("utf-8")
    if path.endswith(".xz"):
        with lzma.open(path, "rb") as f:
            return f.read().decode("utf-8")
    with open(path, "rb") as f:
        return f.read().decode("utf-8")


def find_list(lists: str, stem: str) -> str:
    for ext in (".lz4", ".xz", ".gz", ""):
        path = os.path.join(lists, stem + ext)
        if os.path.exists(path):
            return path
    sys.exit(f"not found: {os.path.join(lists, stem)}[.lz4|.xz|.gz] (see --help for how to fetch it)")


def stanzas(text: str):
    """Deb822 stanzas as dicts; continuation lines are kept (joined with newlines)."""
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.split("\n"):
            if not line:
                continue
            if line[0] in " \t" and key is not None:
                fields[key] += "\n" + line
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if fields:
            yield fields


# --------------------------------------------------------------------------------------------
# Text

_ABBREV = re.compile(
    r"(?:\b(?:e\.g|i\.e|etc|vs|cf|al|approx|incl|resp|esp|viz|Dr|Mr|Mrs|Ms|St|Jr|Sr|Inc|Ltd|Co|No|Vol|Fig|Sec|Ch)"
    r"|\b[A-Z]|\.\.)\.$"
)
_BAD_LINE = re.compile(r"^ ( |\t|[*+o#>-] |\d+[.)] |[a-z][.)] )")  # verbatim, bullets, numbered lists
_ODD = re.compile(r"[<>{}\[\]|\\_=~`#*^$@]|https?://|www\.|\.{3}|--|\t|\s-\s| {2,}|\s:|:$")


def long_description(desc: str) -> list[str] | None:
    """Paragraphs of a Debian long description (the lines after the first), or None when it
    has verbatim lines, lists or other formatting."""
    lines = desc.split("\n")[1:]
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        if line == " .":
            paragraphs.append([])
            continue
        if _BAD_LINE.match(line) or not line.startswith(" "):
            return None
        paragraphs[-1].append(line.strip())
    out = [" ".join(p) for p in paragraphs if p]
    return out or None


def sentences(paragraph: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", paragraph)
    out: list[str] = []
    buf = ""
    for part in parts:
        buf = f"{buf} {part}" if buf else part
        if _ABBREV.search(buf):
            continue
        out.append(buf)
        buf = ""
    if buf:
        out.append(buf)
    return out


def good_bullet(sentence: str) -> bool:
    words = sentence.split()
    return (
        BULLET_MIN_WORDS <= len(words) <= BULLET_MAX_WORDS
        and sentence.endswith(".")
        and not sentence.endswith("etc.")
        and not _ODD.search(sentence)
        and sentence.count("(") == sentence.count(")")
        and sentence.count('"') % 2 == 0
    )


def summary_line(short: str) -> str | None:
    s = short.strip()
    if not s or not s[0].isalpha() or _ODD.search(s) or s.endswith(("..", ":", ",", ";")):
        return None
    s = s[0].upper() + s[1:]
    if not s.endswith("."):
        s += "."
    return s


def make_record(name: str, section: str, short: str, long_paragraphs: list[str]) -> dict | None:
    summary = summary_line(short)
    if summary is None:
        return None
    all_sentences = [s for p in long_paragraphs for s in sentences(p)]
    if len(all_sentences) < 3:
        return None
    # Facts: whole sentences from the start, at most FACTS_MAX_WORDS words (at least one).
    facts: list[str] = []
    words = 0
    for s in all_sentences:
        n = len(s.split())
        if facts and words + n > FACTS_MAX_WORDS:
            break
        facts.append(s)
        words += n
    bullets = [s for s in facts if good_bullet(s)][:3]
    if len(bullets) < 3:
        return None
    category = SECTION_NAMES[section]
    prompt = (
        f"Write the product description for {name}.\n"
        f"Summary: {short.strip()}\n"
        f"Section: {section}\n"
        f"Facts: {' '.join(facts)}"
    )
    completion = "\n".join(
        [f"## {name}", "", f"> {summary}", ""] + [f"- {b}" for b in bullets] + ["", f"Category: {category}"]
    )
    if len(completion) > MAX_COMPLETION_CHARS:
        return None
    assert adheres(completion), completion
    return {"id": name, "prompt": prompt, "completion": completion}


def name_hash(name: str) -> int:
    return int(hashlib.sha256(("house-style/" + name).encode()).hexdigest()[:8], 16)


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lists", default="/var/lib/apt/lists", help="apt lists directory")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()

    packages_path = find_list(args.lists, "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages")
    translation_path = find_list(args.lists, "deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en")
    release_path = os.path.join(args.lists, "deb.debian.org_debian_dists_bookworm_InRelease")
    packages_text = read_list(packages_path)
    translation_text = read_list(translation_path)

    translations: dict[tuple[str, str], str] = {}
    for st in stanzas(translation_text):
        if "Package" in st and "Description-md5" in st and "Description-en" in st:
            translations[(st["Package"], st["Description-md5"])] = st["Description-en"]

    stats: Counter = Counter()
    candidates: dict[str, dict] = {}
    seen_names: set[str] = set()
    for st in stanzas(packages_text):
        name = st.get("Package")
        if not name or name in seen_names:
            continue
        seen_names.add(name)
        stats["packages"] += 1
        section = st.get("Section", "")
        if section not in SECTION_NAMES:
            stats["skip: section"] += 1
            continue
        if name.endswith(SKIP_SUFFIXES):
            stats["skip: -dev/-doc/... name"] += 1
            continue
        desc = translations.get((name, st.get("Description-md5", "")))
        if desc is None:
            stats["skip: no long description"] += 1
            continue
        if not desc.isascii():
            stats["skip: not ASCII"] += 1
            continue
        paragraphs = long_description(desc)
        if paragraphs is None:
            stats["skip: lists/verbatim/empty"] += 1
            continue
        record = make_record(name, section, desc.split("\n")[0], paragraphs)
        if record is None:
            stats["skip: < 3 sentences / bullets / bad summary"] += 1
            continue
        record["_section"] = section
        record["_long"] = " ".join(paragraphs)
        candidates[name] = record

    # One record per long description and per first bullet: the package whose name sorts first.
    seen_long: set[str] = set()
    seen_first: set[str] = set()
    unique: list[dict] = []
    for name in sorted(candidates):
        r = candidates[name]
        first = r["completion"].split("\n- ")[1].split("\n")[0]
        if r["_long"] in seen_long or first in seen_first:
            stats["skip: duplicate text"] += 1
            continue
        seen_long.add(r["_long"])
        seen_first.add(first)
        unique.append(r)
    stats["eligible"] = len(unique)

    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    caps = {"train": N_TRAIN, "heldout": N_HELDOUT}
    per_section: dict[str, Counter] = {"train": Counter(), "heldout": Counter()}
    for r in sorted(unique, key=lambda r: (name_hash(r["id"]), r["id"])):
        split = "heldout" if name_hash(r["id"]) % 1000 < HELDOUT_PER_MILLE else "train"
        if len(splits[split]) >= caps[split]:
            continue
        if per_section[split][r["_section"]] >= MAX_PER_SECTION_SHARE * caps[split]:
            continue
        per_section[split][r["_section"]] += 1
        splits[split].append(r)

    os.makedirs(args.out, exist_ok=True)
    for split, records in splits.items():
        records.sort(key=lambda r: r["id"])
        path = os.path.join(args.out, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for r in records:
                f.write(json.dumps({k: r[k] for k in ("id", "prompt", "completion")}, ensure_ascii=True) + "\n")
        print(f"{path}: {len(records)} records, {os.path.getsize(path)} bytes")

    def sha256(path: str) -> str:
        return hashlib.sha256(read_list(path).encode("utf-8")).hexdigest()

    release = {}
    if os.path.exists(release_path):
        with open(release_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("Version:", "Date:", "Suite:", "Codename:")):
                    k, v = line.split(":", 1)
                    release[k] = v.strip()
                if line.startswith("-----BEGIN PGP SIGNATURE"):
                    break
    manifest = {
        "release": release,
        "inputs": {
            os.path.basename(packages_path): sha256(packages_path),
            os.path.basename(translation_path): sha256(translation_path),
        },
        "sha256_is_of": "the decompressed file",
        "stats": dict(stats),
        "sections": {s: dict(sorted(c.items(), key=lambda kv: -kv[1])) for s, c in per_section.items()},
        "format_regex": FORMAT_RE.pattern,
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    for k, v in stats.items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
