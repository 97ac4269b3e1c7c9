#!/usr/bin/env python3
"""qpai's Batch API against the same work sent as concurrent HTTP requests.

1. Local model: `qpai serve` on SmolLM2; `--rows` chat requests naming the
   versioned prompt product_description@2 (a shared prefix: the same system
   turn and instructions, a different product per row), greedy,
   `--max-tokens` each.
     batch: files.create + batches.create, polled until completed; lines/s,
            completion tokens/s, and the mean time a line took to run
            (batch_lines.run_ms: its claim to its answer);
     http:  the same bodies, `--concurrency` requests at a time; requests/s,
            completion tokens/s, mean latency per request.
2. Routed upstream: `qpai serve` routing to `qpai bench-upstream` (answers at
   once), `--upstream-lines` lines as one batch against the same number of
   requests from `qpai bench-router` (`--connections` connections): lines/s
   or requests/s, and qpai's own CPU time per line or request (from
   /proc/PID/stat), which is what qpai adds.
Each measurement is the median of `--runs` runs; modes alternate within a run.

Usage (see docs/batch.md):
    ~/.cache/qpai-venv/bin/python benches/batch_compare.py
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sqlite3
import statistics
import subprocess
import tempfile
import time
import urllib.request

from router_compare import free_port, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QPAI = os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target")), "debug", "qpai"
)
MODEL = "smollm2-135m-instruct"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def post(base: str, path: str, body: bytes, content_type: str = "application/json") -> dict:
    request = urllib.request.Request(f"{base}{path}", data=body, headers={"content-type": content_type})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def get(base: str, path: str) -> dict:
    with urllib.request.urlopen(f"{base}{path}", timeout=60) as response:
        return json.load(response)


def upload(base: str, lines: list[dict]) -> str:
    boundary = "qpai-bench"
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return post(base, "/v1/files", body, f"multipart/form-data; boundary={boundary}")["id"]


def run_batch(base: str, lines: list[dict]) -> tuple[float, dict]:
    """Seconds from creating the batch to its completion, and the batch."""
    file_id = upload(base, lines)
    started = time.perf_counter()
    batch = post(base, "/v1/batches", json.dumps(
        {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    ).encode())
    while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.05)
        batch = get(base, f"/v1/batches/{batch['id']}")
    seconds = time.perf_counter() - started
    assert batch["status"] == "completed", batch
    assert batch["request_counts"]["failed"] == 0, batch
    return seconds, batch


def mean_run_ms(data_dir: str, batch_id: str) -> float:
    with sqlite3.connect(os.path.join(data_dir, "qpai.db")) as db:
        return db.execute("SELECT AVG(run_ms) FROM batch_lines WHERE batch_id = ?", (batch_id,)).fetchone()[0]


def run_http(base: str, bodies: list[dict], concurrency: int) -> tuple[float, int, float]:
    """Seconds for all requests, completion tokens, mean latency (s)."""
    def one(body: dict) -> tuple[int, float]:
        started = time.perf_counter()
        answer = post(base, "/v1/chat/completions", json.dumps(body).encode())
        return answer["usage"]["completion_tokens"], time.perf_counter() - started

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, bodies))
    seconds = time.perf_counter() - started
    return seconds, sum(t for t, _ in results), statistics.mean(l for _, l in results)


def local(args) -> None:
    data_dir = tempfile.mkdtemp(prefix="qpai-batch-bench-")
    port = free_port()
    env = dict(os.environ, QPAI_DATA_DIR=data_dir)
    env.pop("QPAI_DATABASE_URL", None)
    server = subprocess.Popen(
        [QPAI, "serve", "--port", str(port), "--model", MODEL, "--embedding-model", "",
         "--batch-concurrency", str(args.concurrency), "--max-running", str(args.concurrency)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/ready", server)
        bodies = [
            {"model": MODEL, "max_tokens": args.max_tokens, "temperature": 0,
             "prompt": {"id": "product_description", "version": "2",
                        "variables": {"product": f"Garden tool no. {i}", "features": ["steel", "ash handle"]}}}
            for i in range(args.rows)
        ]
        lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}
                 for i, b in enumerate(bodies)]
        batch_runs, http_runs = [], []
        for run in range(args.runs):
            seconds, batch = run_batch(base, lines)
            batch_runs.append((seconds, batch["usage"]["output_tokens"], mean_run_ms(data_dir, batch["id"]) / 1000))
            http_runs.append(run_http(base, bodies, args.concurrency))
            print(f"run {run + 1}: batch {seconds:.1f} s, http {http_runs[-1][0]:.1f} s", flush=True)
    finally:
        server.terminate()
        server.wait()

    def row(name: str, runs: list[tuple[float, int, float]]) -> tuple[str, float, float, float]:
        lines_per_s = statistics.median(args.rows / s for s, _, _ in runs)
        tokens_per_s = statistics.median(t / s for s, t, _ in runs)
        latency = statistics.median(l for _, _, l in runs)
        return name, lines_per_s, tokens_per_s, latency

    table = [row("batch (/v1/batches)", batch_runs), row(f"HTTP, {args.concurrency} at a time", http_runs)]
    print(f"\n{args.rows} rows on {MODEL}, {args.max_tokens} tokens each, medians of {args.runs} runs\n")
    print("| mode | lines/s | completion tokens/s | mean latency per line |")
    print("|---|---|---|---|")
    for name, lps, tps, latency in table:
        print(f"| {name} | {lps:.2f} | {tps:.1f} | {latency:.2f} s |")
    print(f"| batch / HTTP | {table[0][1] / table[1][1]:.2f}x | {table[0][2] / table[1][2]:.2f}x | |")


def upstream(args) -> None:
    data_dir = tempfile.mkdtemp(prefix="qpai-batch-bench-")
    upstream_port, port = free_port(), free_port()
    bench = subprocess.Popen([QPAI, "bench-upstream", "--port", str(upstream_port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    catalog = os.path.join(data_dir, "router.toml")
    with open(catalog, "w") as f:
        f.write(f"""
[[deployment]]
name = "bench"
provider = "openai_compatible"
model = "bench"
base_url = "http://127.0.0.1:{upstream_port}/v1"
input_usd_per_1m = 1
output_usd_per_1m = 2
context_window = 8192
batch_discount = 0.5
batch_concurrency = {args.connections}
""")
    env = dict(os.environ, QPAI_DATA_DIR=data_dir)
    env.pop("QPAI_DATABASE_URL", None)
    server = subprocess.Popen(
        [QPAI, "serve", "--port", str(port), "--model", MODEL, "--embedding-model", "",
         "--router-config", catalog, "--batch-concurrency", str(args.connections)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/ready", server)
        lines = [{"custom_id": f"u{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "bench", "messages": [{"role": "user", "content": f"line {i}"}],
                           "max_tokens": 16}}
                 for i in range(args.upstream_lines)]
        batch_runs, http_runs = [], []
        for run in range(args.runs):
            cpu = cpu_seconds(server.pid)
            seconds, _ = run_batch(base, lines)
            batch_runs.append((args.upstream_lines / seconds, (cpu_seconds(server.pid) - cpu) / args.upstream_lines))
            cpu = cpu_seconds(server.pid)
            out = subprocess.run(
                [QPAI, "bench-router", "--url", f"{base}/v1", "--model", "bench",
                 "--connections", str(args.connections), "--requests", str(args.upstream_lines),
                 "--warmup", "0"],
                check=True, capture_output=True, text=True,
            ).stdout
            report = json.loads(out.strip().splitlines()[-1])
            http_runs.append((report["requests_per_s"], (cpu_seconds(server.pid) - cpu) / args.upstream_lines))
            print(f"run {run + 1}: batch {batch_runs[-1][0]:.0f} lines/s, http {http_runs[-1][0]:.0f} req/s", flush=True)
    finally:
        server.terminate()
        server.wait()
        bench.terminate()
        bench.wait()
    batch_rate = statistics.median(r for r, _ in batch_runs)
    batch_cpu = statistics.median(c for _, c in batch_runs) * 1000
    http_rate = statistics.median(r for r, _ in http_runs)
    http_cpu = statistics.median(c for _, c in http_runs) * 1000
    print(f"\n{args.upstream_lines} lines to `qpai bench-upstream`, {args.connections} at a time, medians of {args.runs} runs\n")
    print("| mode | lines/s | qpai CPU per line |")
    print("|---|---|---|")
    print(f"| batch (/v1/batches) | {batch_rate:.0f} | {batch_cpu:.2f} ms |")
    print(f"| HTTP (`qpai bench-router`) | {http_rate:.0f} | {http_cpu:.2f} ms |")
    print(f"| batch / HTTP | {batch_rate / http_rate:.2f}x | {batch_cpu / http_cpu:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--upstream-lines", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=["local", "upstream"])
    args = parser.parse_args()
    if args.only != "upstream":
        local(args)
    if args.only != "local":
        upstream(args)


if __name__ == "__main__":
    main()
