"""The held-out comparison of docs/eval-calibration.md: each route and
`auto` on the held-out split of each task, from the results that
eval/calibration/run.sh wrote.

    python3 eval/calibration/table.py eval/results/calibration

A route's score on a task is its mean case score; its cost, what a
thousand of the task's requests cost there. The mix is the three tasks in
equal shares; a route that cannot serve a task has no mix figure. The best
route is the mix's highest score among those that serve every task.
"""

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

TASKS = [("house_style", "house-style"), ("extraction", "extraction"),
         ("glossary_rag", "glossary-rag")]


def cases(path):
    with path.open() as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def route_of(variant):
    return variant.split(" · ", 1)[1]


def held_out(out):
    """{task: {route: (score, usd per 1k requests, cases)}}, and the routes
    auto took per task."""
    figures, taken = {}, {}
    for tag, name in TASKS:
        sums = defaultdict(lambda: [0.0, 0.0, 0])
        chosen = Counter()
        for run in ("routes", "auto"):
            path = out / f"{name}-{run}" / "results.jsonl"
            for case in cases(path):
                if case.get("group") != "heldout":
                    continue
                route = route_of(case["variant"])
                entry = sums[route]
                entry[0] += case["score"]
                entry[1] += float(case["output"]["cost"])
                entry[2] += 1
                if route == "auto":
                    chosen[case["output"].get("route") or "error"] += 1
        figures[tag] = {r: (s / n, 1000 * c / n, n) for r, (s, c, n) in sums.items()}
        taken[tag] = chosen
    return figures, taken


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "eval/results/calibration")
    figures, taken = held_out(out)
    routes = sorted({r for f in figures.values() for r in f if r != "auto"}) + ["auto"]

    print("Held-out split, per task: mean score, and $ per 1,000 requests.\n")
    header = "| route | " + " | ".join(f"{tag} score | {tag} $/1k" for tag, _ in TASKS)
    print(header + " | mix score | mix $/1k | vs best: score | vs best: cost |")
    print("|---|" + "---:|---:|" * len(TASKS) + "---:|---:|---:|---:|")
    mix = {}
    for route in routes:
        row = [figures[tag].get(route) for tag, _ in TASKS]
        if all(row):
            mix[route] = (sum(r[0] for r in row) / len(row), sum(r[1] for r in row) / len(row))
    best = max((r for r in mix if r != "auto"), key=lambda r: (mix[r][0], -mix[r][1]))
    for route in routes:
        cells = []
        for tag, _ in TASKS:
            figure = figures[tag].get(route)
            cells += [f"{figure[0]:.3f}", f"{figure[1]:.4f}"] if figure else ["–", "–"]
        if route in mix:
            score, cost = mix[route]
            cells += [f"{score:.3f}", f"{cost:.4f}",
                      f"{100 * score / mix[best][0]:.1f}%", f"{100 * cost / mix[best][1]:.1f}%"]
        else:
            cells += ["–"] * 4
        name = f"**{route}** (best)" if route == best else route
        print(f"| {name} | " + " | ".join(cells) + " |")
    # The best route of each task, picked on the held-out split itself: the
    # most any choice of single routes per task could have scored.
    oracle = [max((f for r, f in figures[tag].items() if r != "auto"), key=lambda f: f[0])
              for tag, _ in TASKS]
    score = sum(f[0] for f in oracle) / len(oracle)
    print(f"\nThe best route of each task, picked on the held-out split (an upper bound): "
          f"mix score {score:.3f} at ${sum(f[1] for f in oracle) / len(oracle):.4f} per 1k; "
          f"auto reaches {100 * mix['auto'][0] / score:.1f}% of it.")

    # The tasks every route serves: against each route there, the remote included.
    shared = [tag for tag, _ in TASKS if all(r in figures[tag] for r in routes)]
    print(f"\nOn the tasks every route serves ({', '.join(shared)}):\n")
    print("| route | score | $/1k | auto's score vs it | auto's cost vs it |")
    print("|---|---:|---:|---:|---:|")
    both = {r: (sum(figures[t][r][0] for t in shared) / len(shared),
                sum(figures[t][r][1] for t in shared) / len(shared)) for r in routes}
    for route in routes:
        score, cost = both[route]
        print(f"| {route} | {score:.3f} | {cost:.4f} | {100 * both['auto'][0] / score:.1f}% "
              f"| {100 * both['auto'][1] / cost:.1f}% |")

    counts = {tag: figures[tag]["auto"][2] for tag, _ in TASKS if "auto" in figures[tag]}
    print(f"\nHeld-out cases per task: {counts}.")
    print("\nRoutes auto took on the held-out split:\n")
    for tag, _ in TASKS:
        shares = ", ".join(f"{route} {n}" for route, n in taken[tag].most_common())
        print(f"- {tag}: {shares}")


if __name__ == "__main__":
    main()
