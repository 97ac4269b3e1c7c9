#!/usr/bin/env python3
"""qpai serve vs llama.cpp's llama-server under the same load.

Both servers run the same GGUF file with the same thread count and the same
number of parallel sequences; `qpai bench-serve` drives each in turn with the
same seeded workload (random prompt token ids, outputs forced to their drawn
length with `ignore_eos`) at each concurrency level, and the script prints a
Markdown table of the two and their ratio (medians over --runs).

llama-server is built once from the llama.cpp source that the
llama-cpp-python sdist in benches/requirements.txt carries, with explicit ISA
flags (never -march=native: it crashes on CPUs that report AMX), into
~/.cache/qpai-llama-server.

Usage (see docs/perf.md):
    python3 benches/serve_compare.py --threads 2 --parallel 16
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request

TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target"))
QPAI = os.path.join(TARGET, "debug", "qpai")
CACHE = os.path.expanduser("~/.cache/qpai-llama-server")
HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def isa_cmake_args():
    """Explicit ggml ISA options for this CPU (AVX2 floor, AVX-512 / VNNI when present)."""
    flags = cpu_flags()
    args = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        args.append("-DGGML_AVX512=ON")
        if "avx512_vnni" in flags:
            args.append("-DGGML_AVX512_VNNI=ON")
    if "avx_vnni" in flags:
        args.append("-DGGML_AVX_VNNI=ON")
    return args


def llama_cpp_version():
    with open(os.path.join(HERE, "requirements.txt")) as f:
        for line in f:
            m = re.match(r"llama-cpp-python==([\w.]+)", line.strip())
            if m:
                return m.group(1)
    raise SystemExit("benches/requirements.txt pins no llama-cpp-python version")


def build_llama_server():
    version = llama_cpp_version()
    flags = isa_cmake_args()
    stamp = os.path.join(CACHE, "stamp.json")
    binary = os.path.join(CACHE, "build", "bin", "llama-server")
    wanted = {"version": version, "flags": flags}
    if os.path.exists(binary) and os.path.exists(stamp) and json.load(open(stamp)) == wanted:
        return binary, flags
    shutil.rmtree(CACHE, ignore_errors=True)
    os.makedirs(CACHE)
    with tempfile.TemporaryDirectory() as tmp:
        # The sdist straight from PyPI's simple index (pip download would
        # build its metadata, and with it the build dependencies).
        with urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/") as r:
            index = r.read().decode()
        name = f"llama_cpp_python-{version}.tar.gz"
        url = next(u for u in re.findall(r'href="([^"]+)"', index) if u.split("#")[0].endswith(name))
        url = urllib.parse.urljoin("https://pypi.org/simple/llama-cpp-python/", url.split("#")[0])
        sdist = os.path.join(tmp, name)
        urllib.request.urlretrieve(url, sdist)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        source = glob.glob(os.path.join(tmp, "llama_cpp_python-*", "vendor", "llama.cpp"))[0]
        shutil.copytree(source, os.path.join(CACHE, "src"))
    build = os.path.join(CACHE, "build")
    # cmake from PATH, else the one pip put beside this Python (benches/requirements.txt).
    cmake = shutil.which("cmake") or os.path.join(os.path.dirname(sys.executable), "cmake")
    subprocess.run([cmake, "-S", os.path.join(CACHE, "src"), "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=ON", *flags], check=True)
    subprocess.run([cmake, "--build", build, "--target", "llama-server", "-j", str(os.cpu_count())], check=True)
    json.dump(wanted, open(stamp, "w"))
    return binary, flags


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, process, seconds=300):
    started = time.time()
    while time.time() - started < seconds:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready in {seconds} s")


def gguf_path(model):
    out = subprocess.run([QPAI, "models", "pull", model], check=True, capture_output=True, text=True).stdout
    return out.strip().split(": ", 1)[1]


def bench(url, label, args, run):
    out = os.path.join(tempfile.gettempdir(), f"bench-serve-{label}-{run}.json")
    cmd = [QPAI, "bench-serve", "--url", url, "--model", args.model, "--label", label,
           "--concurrency", args.concurrency, "--prompt-tokens", str(args.prompt_tokens),
           "--output-tokens", str(args.output_tokens), "--shared-prefix-tokens", str(args.shared_prefix_tokens),
           "--seed", str(args.seed), "--json", out]
    if args.requests:
        cmd += ["--requests", str(args.requests)]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    return json.load(open(out))["levels"]


def serve_qpai(args, port):
    cmd = [QPAI, "serve", "--host", "127.0.0.1", "--port", str(port), "--model", args.model,
           "--embedding-model", "", "--threads", str(args.threads), "--max-running", str(args.parallel),
           "--max-in-flight", str(max(args.parallel, max(int(c) for c in args.concurrency.split(","))) * 2)]
    if args.no_prefix_cache:
        cmd.append("--no-prefix-cache")
    env = dict(os.environ, QPAI_DATA_DIR=tempfile.mkdtemp(prefix="qpai-serve-compare-"))
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def serve_llama(args, binary, gguf, port):
    context = args.parallel * (args.shared_prefix_tokens + 2 * (args.prompt_tokens + args.output_tokens))
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
           "-tb", str(args.threads), "--parallel", str(args.parallel), "-c", str(context)]
    # llama-server keeps its own per-slot prompt cache (`cache_prompt`, on by
    # default) whatever --no-prefix-cache says: that flag only turns qpai's off.
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def median_levels(runs):
    """Per concurrency level, the median of each figure over the runs."""
    out = []
    for levels in zip(*runs):
        merged = {"concurrency": levels[0]["concurrency"]}
        for key in ("output_throughput", "total_token_throughput", "request_throughput"):
            merged[key] = statistics.median(l[key] for l in levels)
        for key in ("ttft", "tpot", "itl", "e2el"):
            merged[key] = {k: statistics.median(l[key][k] for l in levels) for k in levels[0][key]}
        merged["failed"] = sum(l["failed"] for l in levels)
        out.append(merged)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--parallel", type=int, default=16, help="sequences decoded together on each server")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests", type=int, help="requests per level (default: bench-serve's)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--shared-prefix-tokens", type=int, default=0)
    parser.add_argument("--no-prefix-cache", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    binary, flags = build_llama_server()
    gguf = gguf_path(args.model)
    results = {}
    for name in ("qpai", "llama-server"):
        port = free_port()
        process = serve_qpai(args, port) if name == "qpai" else serve_llama(args, binary, gguf, port)
        try:
            # qpai's /ready (its /health answers before the model is loaded);
            # llama-server's /health turns 200 once its model is loaded.
            probe = "ready" if name == "qpai" else "health"
            wait_ready(f"http://127.0.0.1:{port}/{probe}", process)
            results[name] = median_levels(
                [bench(f"http://127.0.0.1:{port}/v1", name, args, run) for run in range(args.runs)])
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)

    print(f"\n{args.model}, {args.threads} threads, {args.parallel} parallel sequences, prompts "
          f"{args.shared_prefix_tokens}+{args.prompt_tokens} tokens, outputs {args.output_tokens}, "
          f"medians of {args.runs} runs; llama-server built with {' '.join(flags)}\n")
    print("| streams | metric | qpai | llama-server | qpai / llama-server |")
    print("|---|---|---|---|---|")
    for ours, theirs in zip(results["qpai"], results["llama-server"]):
        c = ours["concurrency"]
        rows = [
            ("output tok/s", ours["output_throughput"], theirs["output_throughput"], True),
            ("total tok/s", ours["total_token_throughput"], theirs["total_token_throughput"], True),
            ("TTFT p50 ms", ours["ttft"]["median_ms"], theirs["ttft"]["median_ms"], False),
            ("TTFT p99 ms", ours["ttft"]["p99_ms"], theirs["ttft"]["p99_ms"], False),
            ("TPOT p50 ms", ours["tpot"]["median_ms"], theirs["tpot"]["median_ms"], False),
            ("TPOT p99 ms", ours["tpot"]["p99_ms"], theirs["tpot"]["p99_ms"], False),
            ("E2EL p99 ms", ours["e2el"]["p99_ms"], theirs["e2el"]["p99_ms"], False),
        ]
        for metric, a, b, higher_better in rows:
            ratio = (a / b if higher_better else b / a) if a and b else float("nan")
            print(f"| {c} | {metric} | {a:.1f} | {b:.1f} | {ratio:.2f}x |")
        if ours["failed"] or theirs["failed"]:
            print(f"| {c} | failed requests | {ours['failed']} | {theirs['failed']} | |")
    print("\nRatios: above 1.0x means qpai is better (higher throughput, lower latency).")


if __name__ == "__main__":
    main()
