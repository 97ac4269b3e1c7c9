#!/usr/bin/env python3
"""A 20,000-case eval suite in qpai's harness and in promptfoo, side by side.

Both run the same cases against the same OpenAI-compatible upstream
(`qpai bench-upstream`, which answers at once), with the same prompt, the
same two assertions per case (contains "ok", and a case-insensitive
contains-any of two words) and the same concurrency, caches off. Each
measurement is a fresh process; the table gives wall time, cases/s and peak
RSS (ru_maxrss of the process tree), medians of `--runs` runs, tools
alternating within a run.

Usage (see docs/eval.md):
    python3 benches/eval_compare.py --cases 20000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import tempfile
import time

from router_compare import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QPAI = os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target")), "debug", "qpai"
)
PROMPTFOO = os.path.expanduser("~/.cache/qpai-bench-promptfoo/node_modules/.bin/promptfoo")


def wait_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    started = time.time()
    while time.time() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"{process.args[0]} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} did not open in {timeout} s")


def measured(command: list[str], env: dict, cwd: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of `command`, run in a fresh child
    whose own children's ru_maxrss is read after they end."""
    probe = (
        "import resource, subprocess, sys, time\n"
        "t = time.time()\n"
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
        "w = time.time() - t\n"
        "if r.returncode not in (0, 100): sys.stderr.write(r.stderr.decode()[-3000:]); sys.exit(r.returncode)\n"
        "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run(["python3", "-c", probe, *command], env=env, cwd=cwd,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{out.stderr}")
    wall, rss_kib = out.stdout.split()
    return float(wall), int(rss_kib) / 1024


def write_inputs(work: str, cases: int, port: int, concurrency: int) -> None:
    with open(os.path.join(work, "cases.jsonl"), "w") as f:
        for i in range(cases):
            f.write(json.dumps({"id": f"c{i}", "product": f"Garden tool {i}"}) + "\n")
    with open(os.path.join(work, "cases.csv"), "w") as f:
        f.write("product\n")
        for i in range(cases):
            f.write(f"Garden tool {i}\n")
    with open(os.path.join(work, "router.toml"), "w") as f:
        f.write(
            '[[deployment]]\nname = "bench"\nprovider = "openai_compatible"\nmodel = "bench"\n'
            f'base_url = "http://127.0.0.1:{port}/v1"\ninput_usd_per_1m = 0.15\n'
            "output_usd_per_1m = 0.6\ncontext_window = 8192\n"
        )
    with open(os.path.join(work, "suite.toml"), "w") as f:
        f.write(
            'name = "bench"\n[dataset]\npath = "cases.jsonl"\n[defaults]\nmax_tokens = 8\n'
            '[variants]\nprompts = [{ label = "p", messages = [{ role = "user", content = '
            '"Describe {{ product }} in one word." }] }]\nmodels = ["bench"]\n'
            '[[assert]]\ntype = "contains"\nvalue = "ok"\n'
            '[[assert]]\ntype = "icontains-any"\nvalue = ["OK", "fine"]\n'
        )
    with open(os.path.join(work, "promptfooconfig.yaml"), "w") as f:
        f.write(
            "prompts:\n  - 'Describe {{product}} in one word.'\n"
            "providers:\n  - id: openai:chat:bench\n    config:\n"
            f"      apiBaseUrl: http://127.0.0.1:{port}/v1\n      apiKey: bench\n      max_tokens: 8\n"
            "defaultTest:\n  assert:\n    - type: contains\n      value: ok\n"
            "    - type: icontains-any\n      value: [OK, fine]\n"
            "tests: file://cases.csv\n"
            f"evaluateOptions:\n  maxConcurrency: {concurrency}\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="qpai-eval-bench-")
    port = free_port()
    upstream = subprocess.Popen([QPAI, "bench-upstream", "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, upstream)
        write_inputs(work, args.cases, port, args.concurrency)
        env = dict(os.environ, QPAI_DATA_DIR=os.path.join(work, "qpai"), RUST_LOG="warn",
                   PROMPTFOO_CONFIG_DIR=os.path.join(work, "promptfoo"),
                   PROMPTFOO_DISABLE_TELEMETRY="1", PROMPTFOO_DISABLE_UPDATE="1",
                   PROMPTFOO_CACHE_ENABLED="false", OPENAI_API_KEY="bench")
        qpai_command = [QPAI, "eval", "run", "suite.toml", "--router-config", "router.toml",
                        "--no-cache", "--concurrency", str(args.concurrency), "--out", "qpai-out"]
        promptfoo_command = [PROMPTFOO, "eval", "-c", "promptfooconfig.yaml", "--no-cache",
                             "--no-progress-bar", "--no-table", "-j", str(args.concurrency),
                             "-o", "promptfoo-out.json"]
        results: dict[str, list[tuple[float, float]]] = {"qpai": [], "promptfoo": []}
        for run in range(args.runs):
            for name, command in (("qpai", qpai_command), ("promptfoo", promptfoo_command)):
                wall, rss = measured(command, env, work)
                results[name].append((wall, rss))
                print(f"run {run + 1} {name}: {wall:.1f} s, {args.cases / wall:.0f} cases/s, "
                      f"peak RSS {rss:.0f} MiB", flush=True)
        with open(os.path.join(work, "qpai-out", "results.json")) as f:
            summary = json.load(f)
        passed = summary["variants"][0]["passes"]
        print(f"\nqpai: {passed}/{args.cases} passed; work dir {work}")
        rows = {}
        for name, runs in results.items():
            wall = statistics.median(w for w, _ in runs)
            rss = statistics.median(r for _, r in runs)
            rows[name] = (wall, args.cases / wall, rss)
        print(f"\n{args.cases} cases, 2 assertions each, concurrency {args.concurrency}, "
              f"medians of {args.runs} runs\n")
        print("| tool | wall s | cases/s | peak RSS MiB |\n|---|---|---|---|")
        for name, (wall, rate, rss) in rows.items():
            print(f"| {name} | {wall:.1f} | {rate:.0f} | {rss:.0f} |")
        q, p = rows["qpai"], rows["promptfoo"]
        print(f"\nqpai / promptfoo: {q[1] / p[1]:.2f}x the cases/s, {q[2] / p[2]:.2f}x the peak RSS")
    finally:
        upstream.terminate()


if __name__ == "__main__":
    main()
