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
Prints a Markdown table: requests/s, p50 / p99 latency, the latency each
router adds over the direct call, and qpai's requests/s over LiteLLM's.

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
    os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/qpai-target")), "debug", "qpai"
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


def load(url: str, model: str, args, key: str | None = None) -> dict:
    command = [QPAI, "bench-router", "--url", url, "--model", model,
               "--connections", str(args.connections), "--requests", str(args.requests),
               "--warmup", str(args.warmup)]
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
        key = subprocess.run([QPAI, "keys", "create", "--tenant", "bench", "--monthly-budget-usd", "1000000"],
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
        lite_process = subprocess.Popen(
            [litellm, "--config", litellm_config, "--port", str(litellm_port),
             "--num_workers", str(args.litellm_workers)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=dict(os.environ, LITELLM_LOG="ERROR", LITELLM_MASTER_KEY=master_key))
        processes.append(lite_process)

        wait_for(f"http://127.0.0.1:{qpai_port}/ready", qpai)
        wait_for(f"http://127.0.0.1:{litellm_port}/health/liveliness", lite_process)

        direct = load(upstream, "bench", args)
        routed = load(f"http://127.0.0.1:{qpai_port}/v1", "bench", args, key)
        lite_args = argparse.Namespace(**{**vars(args), "requests": args.litellm_requests,
                                          "warmup": min(args.warmup, args.litellm_requests // 5)})
        lite = load(f"http://127.0.0.1:{litellm_port}/v1", "bench", lite_args, master_key)
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    print(f"{args.connections} connections, {os.cpu_count()} cores, everything on this machine\n")
    print("| target | requests | errors | requests/s | p50 ms | p99 ms | added p50 ms | added p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in (("upstream, direct", direct), ("qpai router (key, budget, ledger)", routed),
                    ("LiteLLM proxy", lite)):
        added = ("", "") if r is direct else (f"{r['p50_ms'] - direct['p50_ms']:.2f}",
                                               f"{r['p99_ms'] - direct['p99_ms']:.2f}")
        print(f"| {name} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.0f} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {added[0]} | {added[1]} |")
    print(f"\nqpai / LiteLLM requests/s: {routed['requests_per_s'] / lite['requests_per_s']:.1f}x")


if __name__ == "__main__":
    main()
