#!/usr/bin/env python3
"""Soak a real `qpai serve`: many concurrent streaming chat requests, some clients leaving.

Starts `qpai serve` on the default local model with a fresh data directory and an API key
(so that every request is billed in the SQLite ledger), then keeps `--clients` streaming
chat completions in flight for `--duration-s` seconds. A `--disconnect` share of the clients
close their stream at a random point. A first round of the same load warms the server up,
and RSS is read after it. Then the script checks:

  - the running and queued gauges in /metrics are back at 0;
  - RSS is within `--rss-tolerance` of its level after the warm-up;
  - the server's log has no panic;
  - the ledger: one row per request the server accepted (status 200), no request id twice,
    every stream the client read to the end has its `ok` row;

and prints a summary (JSON with `--json`). It exits non-zero when a check fails.

With `--routed` the server routes to a remote deployment instead: `qpai bench-upstream`
with `--fault-rate` of its answers failing at random (500s, connections closed without an
answer, streams cut before their end, first bytes 300 ms late). Then a stream may also end
with an error event (the upstream broke off; the client is told), and every request has
exactly one ledger row whatever its outcome (refused ones included).

    python benches/soak.py --clients 1000 --duration-s 600            # the full soak
    python benches/soak.py --clients 40 --duration-s 10 --warmup-s 3  # what the test suite runs
    python benches/soak.py --routed --clients 1000 --duration-s 600   # routed, with faults

Needs httpx2 (the openai package brings it; the test venv has both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

import httpx2 as httpx


def qpai_binary(given: str | None) -> str:
    if given:
        return given
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target"))
    return os.path.join(target, "debug", "qpai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    return rss_parts_kib(pid)["VmRSS"]


def rss_parts_kib(pid: int) -> dict[str, int]:
    """VmRSS and its parts (KiB): anonymous memory, file pages (the binary among them) and shared
    memory; and the process's thread count."""
    parts = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
                parts[name] = int(value.split()[0])
    if "VmRSS" not in parts:
        raise RuntimeError("no VmRSS")
    return parts


def gauges(text: str) -> dict[str, float]:
    """Sums of the running and queued gauges over every model."""
    out = {"qpai_running_requests": 0.0, "qpai_queue_depth": 0.0}
    for line in text.splitlines():
        for name in out:
            if line.startswith(name + "{") or line.startswith(name + " "):
                out[name] += float(line.rsplit(" ", 1)[1])
    return out


class Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.accepted = 0
        self.completed = 0
        self.disconnected = 0
        self.refused: dict[int, int] = {}
        self.broken = 0
        self.failed = 0

    def as_dict(self) -> dict:
        return {
            "sent": self.sent,
            "accepted": self.accepted,
            "completed": self.completed,
            "disconnected": self.disconnected,
            "refused": self.refused,
            "broken_by_upstream": self.broken,
            "failed": self.failed,
        }


async def one_request(client: httpx.AsyncClient, args, rng: random.Random, tally: Tally) -> None:
    leave_after = rng.randint(0, args.max_tokens) if rng.random() < args.disconnect else None
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": f"Say something about bicycles, number {rng.randint(0, 10**6)}."}],
        "max_tokens": rng.randint(1, args.max_tokens),
        "stream": True,
    }
    tally.sent += 1
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                tally.refused[response.status_code] = tally.refused.get(response.status_code, 0) + 1
                return
            tally.accepted += 1
            events = 0
            finished = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    finished = True
                    break
                if line.startswith('data: {"error"'):
                    tally.broken += 1  # the stream ended with its error
                    return
                events += 1
                if leave_after is not None and events > leave_after:
                    tally.disconnected += 1
                    return  # closing the context drops the connection
            if finished:
                tally.completed += 1
            elif leave_after is None:
                tally.failed += 1
    except httpx.HTTPError:
        tally.failed += 1


async def load(base: str, key: str, args, seconds: float, seed: int) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=args.clients + 10, max_keepalive_connections=args.clients)
    headers = {"Authorization": f"Bearer {key}"}
    timeout = httpx.Timeout(300.0)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=timeout) as client:
        async def worker(index: int) -> None:
            rng = random.Random(seed * 100_003 + index)
            while time.monotonic() < deadline:
                await one_request(client, args, rng, tally)

        await asyncio.gather(*(worker(i) for i in range(args.clients)))
    return tally


def wait_ready(base: str, server: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"qpai serve exited with {server.returncode}")
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("qpai serve did not become ready")


def in_flight(base: str) -> dict[str, float]:
    """Requests running and waiting, from /metrics' gauges and /ready's counters."""
    now = gauges(httpx.get(base + "/metrics", timeout=10).text)
    for model in httpx.get(base + "/ready", timeout=10).json()["models"]:
        now[f"{model['id']} running"] = model["running"]
        now[f"{model['id']} waiting"] = model["waiting"]
    return now


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--qpai", help="path of the qpai binary")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--duration-s", type=float, default=600)
    p.add_argument("--warmup-s", type=float, default=30)
    p.add_argument("--disconnect", type=float, default=0.3)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-mb", type=int, default=64,
                   help="the server's KV pool, small enough for the warm-up to touch all of it")
    p.add_argument("--rss-tolerance", type=float, default=0.10)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", action="store_true")
    p.add_argument("--server-prefix", default="",
                   help="run the server under this command (e.g. 'heaptrack -o FILE'): a memory profile of the soak")
    p.add_argument("--routed", action="store_true",
                   help="route to a remote deployment (qpai bench-upstream) instead of a local model")
    p.add_argument("--fault-rate", type=float, default=0.2,
                   help="with --routed: the share of upstream answers that fail")
    args = p.parse_args()
    if args.routed:
        args.model = "bench"

    binary = qpai_binary(args.qpai)
    data = tempfile.mkdtemp(prefix="qpai-soak-")
    env = dict(os.environ)
    env["QPAI_DATA_DIR"] = data
    env.setdefault("QPAI_MODELS_DIR", os.path.join(os.path.expanduser("~/.local/share/qpai"), "models"))
    key = subprocess.run(
        [binary, "keys", "create", "--tenant", "soak"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip().splitlines()[0]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = os.path.join(data, "serve.log")
    command = [binary, "serve", "--port", str(port), "--threads", str(args.threads), "--embedding-model", "",
               "--max-in-flight", str(args.clients + 16), "--kv-cache-mb", str(args.kv_cache_mb)]
    upstream = None
    if args.routed:
        up_port = free_port()
        upstream = subprocess.Popen(
            [binary, "bench-upstream", "--port", str(up_port), "--fault-rate", str(args.fault_rate)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        catalog = os.path.join(data, "router.toml")
        with open(catalog, "w") as f:
            f.write(f"""
[[deployment]]
name = "bench"
provider = "openai_compatible"
model = "bench"
base_url = "http://127.0.0.1:{up_port}/v1"
input_usd_per_1m = 0.15
output_usd_per_1m = 0.60
context_window = 8192
capabilities = ["streaming"]
""")
        command += ["--model", "", "--router-config", catalog]
    with open(log_path, "w") as log:
        server = subprocess.Popen(args.server_prefix.split() + command, env=env, stdout=log, stderr=subprocess.STDOUT)
    checks: dict[str, bool] = {}
    summary: dict = {"clients": args.clients, "duration_s": args.duration_s, "disconnect": args.disconnect}
    try:
        wait_ready(base, server)
        warm = asyncio.run(load(base, key, args, args.warmup_s, args.seed))
        time.sleep(1)
        parts_warm = rss_parts_kib(server.pid)
        rss_warm = parts_warm["VmRSS"]
        started = time.monotonic()
        tally = asyncio.run(load(base, key, args, args.duration_s, args.seed + 1))
        summary["soak_s"] = round(time.monotonic() - started, 1)
        deadline = time.monotonic() + 60
        while True:
            now = in_flight(base)
            if all(v == 0 for v in now.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        summary["gauges_after"] = now
        checks["gauges back at 0"] = all(v == 0 for v in now.values())
        time.sleep(1)
        parts_after = rss_parts_kib(server.pid)
        rss_after = parts_after["VmRSS"]
        summary["rss_mib"] = {"after_warmup": round(rss_warm / 1024, 1), "after_soak": round(rss_after / 1024, 1)}
        summary["rss_parts_mib"] = {
            name: [round(parts_warm.get(name, 0) / 1024, 1), round(parts_after.get(name, 0) / 1024, 1)]
            for name in ("RssAnon", "RssFile", "RssShmem")
        }
        summary["threads"] = [parts_warm.get("Threads"), parts_after.get("Threads")]
        checks[f"RSS within {args.rss_tolerance:.0%} of warm-up"] = rss_after <= rss_warm * (1 + args.rss_tolerance)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if upstream:
            upstream.kill()
            upstream.wait()
    summary["warmup"] = warm.as_dict()
    summary["soak"] = tally.as_dict()
    with open(log_path) as f:
        log_text = f.read()
    checks["no panic in the log"] = re.search(r"panicked|RUST_BACKTRACE", log_text) is None
    checks["no failed request"] = warm.failed == 0 and tally.failed == 0
    db = sqlite3.connect(os.path.join(data, "qpai.db"))
    rows = dict(db.execute("SELECT outcome, COUNT(*) FROM usage_ledger GROUP BY outcome").fetchall())
    distinct = db.execute("SELECT COUNT(DISTINCT request_id), COUNT(*) FROM usage_ledger").fetchone()
    accepted = warm.accepted + tally.accepted
    completed = warm.completed + tally.completed
    disconnected = warm.disconnected + tally.disconnected
    summary["ledger_rows"] = rows
    if args.routed:
        # Every request reached the router's billing, refused ones too.
        sent = warm.sent + tally.sent
        checks["one ledger row per request"] = sum(rows.values()) == sent
        checks["the faults were met"] = tally.broken > 0 and sum(tally.refused.values()) > 0
    else:
        checks["one ledger row per accepted request"] = sum(rows.values()) == accepted
    checks["no request id twice"] = distinct[0] == distinct[1]
    checks["every completed stream has its ok row"] = completed <= rows.get("ok", 0) <= completed + disconnected
    checks["the load ran"] = tally.completed > 0 and tally.disconnected > 0
    summary["checks"] = checks
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for name, value in summary.items():
            if name != "checks":
                print(f"{name}: {value}")
        for name, ok in checks.items():
            print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if all(checks.values()):
        subprocess.run(["rm", "-rf", data])
        return 0
    print(f"kept {data} (serve.log, qpai.db)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
