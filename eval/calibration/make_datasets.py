"""Writes the three task datasets of the routing calibration
(docs/eval-calibration.md), each row tagged with its split: "calibrate"
(measured by `qpai eval calibrate`) or "heldout" (where `auto` is judged).
Deterministic: the same files on every machine.

- house-style.jsonl: the first 40 held-out packages of data/house-style;
- extraction.jsonl: 60 product listings with their brand, product, price
  and city, written from fixed word lists with a fixed seed;
- glossary-rag.jsonl: the 60 glossary definitions of the PostgreSQL 15
  retrieval eval, each asking for the term it defines.

    python3 eval/calibration/make_datasets.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def split(index):
    return "calibrate" if index % 2 == 0 else "heldout"


def write(name, rows):
    path = HERE / name
    with path.open("w") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{path.relative_to(ROOT)}: {len(rows)} rows")


def house_style():
    lines = (ROOT / "data/house-style/heldout.jsonl").read_text().splitlines()[:40]
    rows = []
    for index, line in enumerate(lines):
        row = json.loads(line)
        rows.append({"id": row["id"], "split": split(index),
                     "prompt": row["prompt"], "completion": row["completion"]})
    return rows


BRANDS = ["Northwind", "Bluepeak", "Kestrel", "Orchard & Vale", "Lumen", "Tallis",
          "Redfern", "Quillon", "Saltmarsh", "Ivory Lane", "Copperleaf", "Halden"]
PRODUCTS = ["Trail Runner 2", "Aero Kettle", "Linen Throw", "Studio Desk Lamp",
            "Cast Iron Skillet", "Weekender Duffel", "Oak Cutting Board", "Merino Scarf",
            "Pour-Over Set", "Garden Shears", "Wool Beanie", "Ceramic Planter",
            "Travel Mug", "Rain Shell", "Bamboo Sheets", "Desk Organizer"]
CITIES = ["Denver", "Lyon", "Osaka", "Porto", "Leeds", "Austin", "Gdansk",
          "Halifax", "Bergen", "Tucson", "Ghent", "Adelaide"]
TEMPLATES = [
    "{brand} announces the {product}, priced at ${price}. Ships from our {city} warehouse.",
    "New in stock: the {product} by {brand}. Only ${price}, dispatched from {city}.",
    "From {city}: {brand}'s {product} now sells for {price} USD.",
    "The {product} ({brand}) is back for ${price}; orders leave {city} within two days.",
    "{brand} {product} - ${price} - made and shipped in {city}.",
    "Looking for a gift? {brand} makes the {product}, ${price}, from its {city} workshop.",
]


def extraction():
    rng = random.Random(20261203)
    rows = []
    for index in range(60):
        brand, product, city = rng.choice(BRANDS), rng.choice(PRODUCTS), rng.choice(CITIES)
        price = round(rng.randint(500, 25000) / 100, 2)
        shown = f"{price:.2f}"
        text = rng.choice(TEMPLATES).format(brand=brand, product=product, price=shown, city=city)
        rows.append({"id": f"listing-{index:02}", "split": split(index), "text": text,
                     "expected": {"brand": brand, "product": product,
                                  "price": float(shown), "city": city}})
    return rows


# Terms whose id is an abbreviation or differs from the words used.
TERMS = {"fsm": ["free space map", "fsm"], "xid": ["transaction id", "xid"],
         "toast": ["toast"], "wal-file": ["wal file", "wal segment"],
         "sql-object": ["sql object"], "cumulative-statistics": ["cumulative statistics"]}


def glossary_rag():
    rows = []
    source = (ROOT / "eval/retrieval/postgresql-15.jsonl").read_text().splitlines()
    glossary = [json.loads(line) for line in source if '"kind": "glossary"' in line]
    for index, row in enumerate(glossary):
        key = row["id"].removeprefix("glossary-")
        terms = TERMS.get(key, [key.replace("-", " ")])
        rows.append({"id": row["id"], "split": split(index), "definition": row["query"],
                     "terms": terms, "targets": row["targets"]})
    return rows


if __name__ == "__main__":
    write("house-style.jsonl", house_style())
    write("extraction.jsonl", extraction())
    write("glossary-rag.jsonl", glossary_rag())
