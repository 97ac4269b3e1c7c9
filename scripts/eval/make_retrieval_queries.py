#!/usr/bin/env python3
"""Build a retrieval-evaluation query set from the PostgreSQL HTML manual.

Queries and relevance judgements are taken from the documentation authors'
own glossary (glossary.html) and back-of-book index (bookindex.html); nothing
is written by hand.  See eval/retrieval/README.md for the method.

Usage:
    python3 scripts/eval/make_retrieval_queries.py \
        /usr/share/doc/postgresql-doc-15/html eval/retrieval/postgresql-15.jsonl

Python 3 standard library only.  Output is deterministic: inputs are walked in
sorted order and sampling ranks candidates by a SHA-256 of (seed, query), so
re-running over the same HTML gives a byte-identical file.
"""

import argparse
import gzip
import hashlib
import json
import os
import re
import sys
from html.parser import HTMLParser

# Elements that never have an end tag in the XHTML these pages use.
VOID = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr"}

# Pages that are navigation or aggregation rather than content.  They are
# ingested by qpai but are never used as targets.
NON_CONTENT_PAGES = {"index.html", "bookindex.html", "glossary.html", "legalnotice.html"}

# A page that has a table of contents (div.toc) and whose main content, with
# navigation and tables of contents removed, has fewer characters than this
# is treated as a table-of-contents page (e.g. "Part III. Server
# Administration", "SQL Commands", "Chapter 67. GiST Indexes").  Short pages
# without a table of contents (e.g. "DROP GROUP") are content pages.
MIN_CONTENT_CHARS = 400


def read_html(path):
    """Read a page, transparently handling a gzipped copy (page.html.gz)."""
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            data = f.read()
    else:
        with open(path, "rb") as f:
            data = f.read()
    return data.decode("utf-8")


def norm_ws(text):
    return re.sub(r"\s+", " ", text.replace("\u00a0", " ")).strip()


def page_of(href):
    """Map an href to a page path relative to the root, or None if external."""
    if not href or href.startswith("#") or re.match(r"^[a-z]+:", href):
        return None
    page = href.split("#", 1)[0]
    return page or None


# --------------------------------------------------------------------------
# Per-page information: title and amount of real content.


class PageInfoParser(HTMLParser):
    """Collects <title> and the text of the body minus nav header/footer and
    tables of contents (div.navheader, div.navfooter, div.toc)."""

    SKIP_CLASSES = {"navheader", "navfooter", "toc"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.title = []
        self.in_title = False
        self.in_body = False
        self.skip_depth = 0  # >0 while inside a skipped subtree
        self.stack = []  # open tags (non-void) inside body
        self.text = []
        self.has_toc = False

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag == "body":
            self.in_body = True
            return
        if not self.in_body or tag in VOID:
            return
        classes = set((dict(attrs).get("class") or "").split())
        skip = tag == "div" and bool(classes & self.SKIP_CLASSES)
        if tag == "div" and "toc" in classes:
            self.has_toc = True
        self.stack.append(skip)
        if skip:
            self.skip_depth += 1

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag == "body":
            self.in_body = False
            return
        if not self.in_body or tag in VOID or not self.stack:
            return
        if self.stack.pop():
            self.skip_depth -= 1

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        elif self.in_body and self.skip_depth == 0:
            self.text.append(data)


def clean_title(title):
    """Strip DocBook numbering: "25.1. Routine Vacuuming" -> "Routine Vacuuming",
    "Chapter 48. Background Worker Processes" -> "Background Worker Processes"."""
    t = norm_ws(title)
    t = re.sub(r"^(Chapter|Appendix|Part|Reference)\s+[A-Z0-9IVXL]+\.\s+", "", t)
    t = re.sub(r"^[A-Z0-9]+(\.[0-9]+)*\.\s+", "", t)
    return t


def scan_pages(root):
    """Return {relpath: {"title": str, "content_chars": int, "content": bool}}."""
    pages = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not (name.endswith(".html") or name.endswith(".html.gz")):
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel.endswith(".gz"):
                rel = rel[:-3]
            p = PageInfoParser()
            p.feed(read_html(full))
            p.close()
            chars = len(norm_ws(" ".join(p.text)))
            content = (
                rel not in NON_CONTENT_PAGES
                and not rel.endswith("-toc.html")
                and not (p.has_toc and chars < MIN_CONTENT_CHARS)
            )
            pages[rel] = {
                "title": clean_title("".join(p.title)),
                "content_chars": chars,
                "has_toc": p.has_toc,
                "content": content,
            }
    return pages


# --------------------------------------------------------------------------
# Glossary


class GlossaryParser(HTMLParser):
    """Yields glossary entries from glossary.html.

    Layout (DocBook): <dl><dt id="GLOSSARY-X"><span class="glossterm">Term</span></dt>
    <dd class="glossdef"><p>definition</p><p>For more information, see <a class="xref"
    href="page.html">..</a>.</p><p>See Also <a class="glossseealso">..</a></p></dd>...
    Entries without class="glossdef" on <dd> are "See X" redirects.
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.entries = []  # dicts: term, id, paragraphs [(text, hrefs)]
        self.cur = None
        self.in_dt = False
        self.dt_text = []
        self.in_dd = False
        self.dd_is_def = False
        self.in_p = False
        self.p_text = []
        self.p_hrefs = []
        self.p_classes = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "dt":
            self.in_dt = True
            self.dt_text = []
            self.cur = {"id": a.get("id"), "term": None, "paragraphs": []}
            self.entries.append(self.cur)
        elif tag == "dd" and self.cur is not None:
            self.in_dd = True
            self.dd_is_def = "glossdef" in (a.get("class") or "").split()
        elif tag == "p" and self.in_dd:
            self.in_p = True
            self.p_text = []
            self.p_hrefs = []
            self.p_classes = set()
        elif tag == "a" and self.in_p:
            self.p_classes.update((a.get("class") or "").split())
            page = page_of(a.get("href"))
            if page and page != "glossary.html" and page not in self.p_hrefs:
                self.p_hrefs.append(page)

    def handle_endtag(self, tag):
        if tag == "dt" and self.in_dt:
            self.in_dt = False
            self.cur["term"] = norm_ws("".join(self.dt_text))
        elif tag == "dd":
            self.in_dd = False
        elif tag == "p" and self.in_p:
            self.in_p = False
            if self.dd_is_def:
                self.cur["paragraphs"].append(
                    (norm_ws("".join(self.p_text)), list(self.p_hrefs), set(self.p_classes))
                )

    def handle_data(self, data):
        if self.in_dt:
            self.dt_text.append(data)
        elif self.in_p:
            self.p_text.append(data)


def term_variants(term):
    """Names to strip from a definition: "Multi-version concurrency control
    (MVCC)" -> ["Multi-version concurrency control", "MVCC"]; "Analyze
    (operation)" -> ["Analyze"] (lower-case qualifiers are not names)."""
    names = []
    m = re.match(r"^(.*?)\s*\(([^)]*)\)\s*$", term)
    if m:
        names.append(m.group(1))
        if re.fullmatch(r"[A-Z][A-Z0-9]+", m.group(2)):
            names.append(m.group(2))
    else:
        names.append(term)
    return sorted({n for n in names if n}, key=len, reverse=True)


def remove_term(text, term):
    for name in term_variants(term):
        # Whole word(s), case-insensitive, with optional plural suffix and
        # the article in front of it ("A savepoint is" -> "is").
        pat = (r"(?:(?<![\w-])(?:a|an|the)\s+)?(?<![\w-])" + re.escape(name)
               + r"(?:e?s)?(?![\w-])")
        text = re.sub(pat, " ", text, flags=re.IGNORECASE)
    text = norm_ws(text)
    text = re.sub(r"\s+([,.;:)])", r"\1", text)
    text = re.sub(r"\(\s+", "(", text)
    text = re.sub(r"\(\)", "", text)
    return norm_ws(text)


def glossary_queries(root, pages):
    path = os.path.join(root, "glossary.html")
    if not os.path.exists(path):
        path += ".gz"
    gp = GlossaryParser()
    gp.feed(read_html(path))
    gp.close()
    out = []
    stats = {"entries": len(gp.entries), "with_link": 0}
    for e in gp.entries:
        if not e["term"] or not e["paragraphs"]:
            continue  # "See X" redirect entries have no glossdef
        definition = []
        targets = []
        for text, hrefs, classes in e["paragraphs"]:
            if text.startswith("For more information"):
                for h in hrefs:
                    if h not in targets:
                        targets.append(h)
            elif text.startswith("See Also") or "glossseealso" in classes:
                continue
            else:
                definition.append(text)
        if targets:
            stats["with_link"] += 1
        targets = [t for t in targets if t in pages and pages[t]["content"]]
        if not targets:
            continue
        query = remove_term(" ".join(definition), e["term"])
        if len(query.split()) < 5:
            continue
        slug = (e["id"] or e["term"]).lower()
        slug = re.sub(r"^glossary-", "", slug)
        slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
        out.append(
            {"id": "glossary-" + slug, "query": query, "targets": targets,
             "kind": "glossary", "_term": e["term"]}
        )
    return out, stats


# --------------------------------------------------------------------------
# Back-of-book index


class IndexParser(HTMLParser):
    """Yields (path_of_terms, [hrefs]) for every entry in bookindex.html.

    Layout: <dl><dt>term, <a class="indexterm" href="p.html#X">..</a>, ..</dt>
    <dd><dl><dt>subterm, <a ..>..</a></dt>...</dl></dd>...  "(see X)" and
    "(see also X)" cross-references carry links without class="indexterm"
    and are ignored.
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.in_index = False
        self.div_depth = 0
        self.index_div_depth = None
        self.dl_depth = 0
        self.path = []  # term at each dl level
        self.in_dt = False
        self.in_a = 0
        self.dt_text = []
        self.dt_hrefs = []
        self.entries = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div":
            self.div_depth += 1
            if "index" in (a.get("class") or "").split() and self.index_div_depth is None:
                self.index_div_depth = self.div_depth
        if self.index_div_depth is None:
            return
        if tag == "dl":
            self.dl_depth += 1
        elif tag == "dt":
            self.in_dt = True
            self.dt_text = []
            self.dt_hrefs = []
        elif tag == "a" and self.in_dt:
            self.in_a += 1
            if "indexterm" in (a.get("class") or "").split():
                page = page_of(a.get("href"))
                if page and page not in self.dt_hrefs:
                    self.dt_hrefs.append(page)

    def handle_endtag(self, tag):
        if tag == "div":
            if self.index_div_depth == self.div_depth:
                self.index_div_depth = None
            self.div_depth -= 1
            return
        if self.index_div_depth is None:
            return
        if tag == "dl":
            self.dl_depth -= 1
        elif tag == "a" and self.in_dt:
            self.in_a -= 1
        elif tag == "dt" and self.in_dt:
            self.in_dt = False
            raw = norm_ws("".join(self.dt_text))
            if raw.startswith("(see"):
                return  # "(see also X)" pseudo-entry inside a <dd>
            raw = re.sub(r"\(see\s*\)\s*$", "", raw).strip()
            term = raw.rstrip(", ").strip()
            del self.path[self.dl_depth - 1:]
            self.path.append(term)
            self.entries.append((list(self.path), list(self.dt_hrefs)))

    def handle_data(self, data):
        if self.in_dt and self.in_a == 0:
            self.dt_text.append(data)


def strip_trailing_commas(text):
    text = re.sub(r"(,\s*)+$", "", text.strip())
    return text


def index_candidates(root, pages, max_targets):
    path = os.path.join(root, "bookindex.html")
    if not os.path.exists(path):
        path += ".gz"
    ip = IndexParser()
    ip.feed(read_html(path))
    ip.close()
    stats = {"entries": len(ip.entries), "with_links": 0, "skipped_title": 0,
             "skipped_targets": 0, "skipped_short": 0, "skipped_dup": 0}
    cands = []
    seen = set()
    for terms, hrefs in ip.entries:
        if not hrefs:
            continue
        stats["with_links"] += 1
        terms = [strip_trailing_commas(t) for t in terms]
        query = norm_ws(" ".join(t.replace(",", " ") for t in terms if t))
        targets = [h for h in hrefs if h in pages and pages[h]["content"]]
        if not targets or len(targets) != len(hrefs) or len(targets) > max_targets:
            stats["skipped_targets"] += 1
            continue
        if len(re.findall(r"[A-Za-z0-9]", query)) < 3:
            stats["skipped_short"] += 1
            continue
        key = query.lower()
        if any(pages[t]["title"].lower() == key for t in targets):
            stats["skipped_title"] += 1
            continue
        if key in seen:
            stats["skipped_dup"] += 1
            continue
        seen.add(key)
        cands.append({"query": query, "targets": targets, "kind": "index"})
    return cands, stats


def rank_key(seed, text):
    return hashlib.sha256((seed + "\0" + text).encode("utf-8")).hexdigest()


def select_index(cands, n, seed):
    """Pick n candidates, at most one per distinct target set in the first
    pass (round-robin over target sets), so that pages with hundreds of index
    entries (functions-info.html, runtime-config-*.html) do not dominate."""
    groups = {}
    for c in cands:
        groups.setdefault(tuple(sorted(c["targets"])), []).append(c)
    for g in groups.values():
        g.sort(key=lambda c: rank_key(seed, c["query"]))
    order = sorted(groups, key=lambda k: rank_key(seed, "\0".join(k)))
    picked = []
    rnd = 0
    while len(picked) < n:
        progressed = False
        for k in order:
            if rnd < len(groups[k]):
                picked.append(groups[k][rnd])
                progressed = True
                if len(picked) == n:
                    break
        if not progressed:
            break
        rnd += 1
    return picked


def slugify(text):
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:60].strip("-") or "x"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html_root", help="directory with the manual's HTML pages")
    ap.add_argument("output", help="output JSONL path")
    ap.add_argument("--index-count", type=int, default=190,
                    help="number of back-of-book index queries (default 190)")
    ap.add_argument("--max-targets", type=int, default=3,
                    help="skip index entries pointing to more pages (default 3)")
    ap.add_argument("--seed", default="qpai-retrieval-v1",
                    help="seed string for the deterministic sampling")
    args = ap.parse_args(argv)

    pages = scan_pages(args.html_root)
    if not pages:
        sys.exit("no HTML pages under %s" % args.html_root)

    gloss, gstats = glossary_queries(args.html_root, pages)
    gloss.sort(key=lambda q: q["id"])

    cands, istats = index_candidates(args.html_root, pages, args.max_targets)
    picked = select_index(cands, args.index_count, args.seed)
    used = set()
    index_qs = []
    for c in sorted(picked, key=lambda c: (c["query"].lower(), c["query"])):
        base = "index-" + slugify(c["query"])
        qid = base
        i = 2
        while qid in used:
            qid = "%s-%d" % (base, i)
            i += 1
        used.add(qid)
        index_qs.append({"id": qid, "query": c["query"], "targets": c["targets"], "kind": "index"})

    out = [{k: q[k] for k in ("id", "query", "targets", "kind")} for q in gloss] + index_qs
    ids = [q["id"] for q in out]
    assert len(ids) == len(set(ids)), "duplicate ids"
    for q in out:
        for t in q["targets"]:
            assert pages[t]["content"], t

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8", newline="\n") as f:
        for q in out:
            f.write(json.dumps(q, ensure_ascii=False, sort_keys=False) + "\n")

    n_content = sum(1 for p in pages.values() if p["content"])
    print("pages: %d html, %d content, %d navigation/toc"
          % (len(pages), n_content, len(pages) - n_content), file=sys.stderr)
    print("glossary: %d entries, %d with 'For more information' links, %d queries"
          % (gstats["entries"], gstats["with_link"], len(gloss)), file=sys.stderr)
    print("index: %d entries, %d with links, %d candidates, %d queries "
          "(skipped: %d >%d or non-content targets, %d title==query, %d too short, %d duplicate)"
          % (istats["entries"], istats["with_links"], len(cands), len(index_qs),
             istats["skipped_targets"], args.max_targets, istats["skipped_title"],
             istats["skipped_short"], istats["skipped_dup"]), file=sys.stderr)
    print("wrote %d queries to %s" % (len(out), args.output), file=sys.stderr)


if __name__ == "__main__":
    main()
