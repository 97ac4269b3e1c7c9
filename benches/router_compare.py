#!/usr/bin/env python3
"""qpai's router vs LiteLLM's proxy, fronting the same upstream on loopback.

Starts `qpai bench-upstream` (an OpenAI-compatible endpoint that answers at
once), then measures with `qpai bench-router` (one load generator for all,
`--connections` concurrent connections):
  1. the upstream called directly (the baseline),
  2. `qpai serve` routing a deployment to it, with an API key, budget and
     the SQLite usage ledger on (every request authenticated, counted,
     held against the budget and written to the ledger),
  3. LiteLLM's proxy (`litellm --config`) with the same upstream as an
     `openai/` model and a master key (LiteLLM refuses to start without
     one); it has no database here, so it keeps no spend per key: it does
     less per request than qpai does.
Two measurements, each a Markdown table:
  - throughput: each target as fast as `--connections` connections go
    (closed loop); requests/s, and qpai's over LiteLLM's;
  - added latency: the same connections at a fixed offered rate (open loop,
    latency counted from each request's scheduled time), the direct call
    at the same rate as the baseline: p50 / p99 and what each router adds.
    LiteLLM gets a lower rate, one it can sustain.

Usage (see docs/router.md):
    ~/.cache/qpai-bench-venv/bin/pip install -r benches/requirements.txt
    ~/.cache/qpai-bench-venv/bin/python benches/router_compare.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QPAI = os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target")), "debug", "qpai"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    started = time.time()
    while time.time() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"{process.args[0]} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer in {timeout} s")


def load(url: str, model: str, args, key: str | None = None, rate: float | None = None,
         requests: int | None = None) -> dict:
    requests = requests or args.requests
    command = [QPAI, "bench-router", "--url", url, "--model", model,
               "--connections", str(args.connections), "--requests", str(requests),
               "--warmup", str(min(args.warmup, requests // 5))]
    if rate:
        command += ["--rate", str(rate)]
    env = dict(os.environ)
    if key:
        env["QPAI_BENCH_KEY"] = key
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--litellm-requests", type=int, default=3000,
                        help="LiteLLM is slower: fewer requests keep the run short")
    parser.add_argument("--litellm-workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=1000,
                        help="offered requests/s for the latency table (qpai)")
    parser.add_argument("--litellm-rate", type=float, default=100,
                        help="offered requests/s for the latency table (LiteLLM)")
    parser.add_argument("--database-url", default="",
                        help="qpai's ledger (default: SQLite in a fresh data dir); a PostgreSQL "
                             "URL holds budgets in the database")
    parser.add_argument("--budget-usd", type=float, default=1000000,
                        help="the tenant's monthly budget; 0: none (nothing is held)")
    parser.add_argument("--skip-litellm", action="store_true",
                        help="measure the direct call and qpai only")
    args = parser.parse_args()

    processes = []
    work = tempfile.mkdtemp(prefix="qpai-router-bench-")
    try:
        up_port = free_port()
        processes.append(subprocess.Popen([QPAI, "bench-upstream", "--port", str(up_port)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        upstream = f"http://127.0.0.1:{up_port}/v1"

        data = os.path.join(work, "qpai")
        env = dict(os.environ, QPAI_DATA_DIR=data, RUST_LOG="warn")
        env.pop("QPAI_DATABASE_URL", None)
        if args.database_url:
            env["QPAI_DATABASE_URL"] = args.database_url
        budget = ["--monthly-budget-usd", f"{args.budget_usd:.2f}"] if args.budget_usd > 0 else []
        key = subprocess.run([QPAI, "keys", "create", "--tenant", f"bench-{os.getpid()}"] + budget,
                             check=True, capture_output=True, text=True, env=env).stdout.strip()
        catalog = os.path.join(work, "router.toml")
        with open(catalog, "w") as f:
            f.write(f"""
[[deployment]]
name = "bench"
provider = "openai_compatible"
model = "bench"
base_url = "{upstream}"
input_usd_per_1m = 0.15
output_usd_per_1m = 0.60
context_window = 128000
capabilities = ["streaming"]
""")
        qpai_port = free_port()
        qpai = subprocess.Popen(
            [QPAI, "serve", "--port", str(qpai_port), "--router-config", catalog,
             "--embedding-model", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        processes.append(qpai)

        litellm_port = free_port()
        lite_process = None
        litellm_config = os.path.join(work, "litellm.yaml")
        with open(litellm_config, "w") as f:
            f.write(f"""
model_list:
  - model_name: bench
    litellm_params:
      model: openai/bench
      api_base: {upstream}
      api_key: unused
""")
        litellm = os.path.join(os.path.dirname(sys.executable), "litellm")
        master_key = "sk-qpai-bench-" + os.urandom(16).hex()
        if not args.skip_litellm:
            lite_process = subprocess.Popen(
                [litellm, "--config", litellm_config, "--port", str(litellm_port),
                 "--num_workers", str(args.litellm_workers)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=dict(os.environ, LITELLM_LOG="ERROR", LITELLM_MASTER_KEY=master_key))
            processes.append(lite_process)

        wait_for(f"http://127.0.0.1:{qpai_port}/ready", qpai)
        if lite_process:
            wait_for(f"http://127.0.0.1:{litellm_port}/health/liveliness", lite_process)

        qpai_url = f"http://127.0.0.1:{qpai_port}/v1"
        lite_url = f"http://127.0.0.1:{litellm_port}/v1"
        direct = load(upstream, "bench", args)
        routed = load(qpai_url, "bench", args, key)
        lite = None if args.skip_litellm else load(lite_url, "bench", args, master_key,
                                                    requests=args.litellm_requests)
        # Open loop: 10 s at the qpai rate, 20 s at LiteLLM's.
        at_rate = int(args.rate * 10)
        lite_at_rate = int(args.litellm_rate * 20)
        direct_fast = load(upstream, "bench", args, rate=args.rate, requests=at_rate)
        routed_fast = load(qpai_url, "bench", args, key, rate=args.rate, requests=at_rate)
        direct_slow = load(upstream, "bench", args, rate=args.litellm_rate, requests=lite_at_rate)
        routed_slow = load(qpai_url, "bench", args, key, rate=args.litellm_rate, requests=lite_at_rate)
        lite_slow = None if args.skip_litellm else load(
            lite_url, "bench", args, master_key, rate=args.litellm_rate, requests=lite_at_rate)
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    ledger = "PostgreSQL" if args.database_url.startswith("postgres") else "SQLite"
    held = "budget" if args.budget_usd > 0 else "no budget"
    qpai_name = f"qpai router (key, {held}, {ledger} ledger)"
    print(f"{args.connections} connections, {os.cpu_count()} cores, everything on this machine\n")
    print("Throughput (closed loop)\n")
    print("| target | requests | errors | requests/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    for name, r in (("upstream, direct", direct), (qpai_name, routed), ("LiteLLM proxy", lite)):
        if r is None:
            continue
        print(f"| {name} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.0f} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    if lite:
        print(f"\nqpai / LiteLLM requests/s: {routed['requests_per_s'] / lite['requests_per_s']:.1f}x")
    print()
    print("Added latency (open loop, fixed offered rate)\n")
    print("| target | offered req/s | requests | errors | p50 ms | p99 ms | added p50 ms | added p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    rows = ((f"upstream, direct", direct_fast, None), (qpai_name, routed_fast, direct_fast),
            ("upstream, direct", direct_slow, None), (qpai_name, routed_slow, direct_slow),
            ("LiteLLM proxy", lite_slow, direct_slow))
    for name, r, base in rows:
        if r is None:
            continue
        added = ("", "") if base is None else (f"{r['p50_ms'] - base['p50_ms']:.2f}",
                                                f"{r['p99_ms'] - base['p99_ms']:.2f}")
        print(f"| {name} | {r['offered_rate']:.0f} | {r['requests']} | {r['errors']} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {added[0]} | {added[1]} |")


if __name__ == "__main__":
    main()
