#!/usr/bin/env bash
# The GPU check, in one run on a machine with an NVIDIA GPU, Python, torch,
# transformers and peft (docs/gpu.md has the results and how it was run):
#
#   scripts/gpu/check.sh QPAI_BINARY OUT_DIR [DEVICE]
#
# QPAI_BINARY: a CUDA build (scripts/build-cuda.sh; .xz is unpacked).
# DEVICE: cuda (default) or cpu, to try the script on a machine without a GPU.
#  1. correctness: `qpai logits` on the device against transformers / PEFT
#     (the committed fixtures: tiny Qwen2, Mistral and Llama checkpoints,
#     the tiny Llama as F32 and Q8_0 GGUF, LoRA adapters unmerged and mixed
#     in one batch, and merged) and against qpai on the CPU;
#  2. a SmolLM2-135M-shaped model with random weights, built here
#     (scripts/gpu/make_models.py): bf16 safetensors and F32 / Q8_0 GGUF
#     against transformers on the GPU;
#  3. the official OpenAI client's tests against `qpai serve --device`;
#  4. speed: `qpai bench` (prefill, decode, 16 and 64 sequences decoded
#     together) on the device and on this machine's CPU, `qpai bench-serve`
#     at 1, 16 and 64 streams, and the GPU's copy bandwidth.
# Writes OUT_DIR/report.md and the raw JSON; exits non-zero when a
# correctness check fails.
set -uo pipefail
bin="$1"; out="$2"; device="${3:-cuda}"
cd "$(dirname "$0")/../.."
mkdir -p "$out"
work="${QPAI_GPU_WORK:-/tmp/qpai-gpu}"
mkdir -p "$work"
report="$out/report.md"
: > "$report"
failures=0
say() { echo "$*" | tee -a "$report"; }

if [[ "$bin" == *.xz ]]; then
  rm -f "$work/qpai"
  xz -dc "$bin" > "$work/qpai" && chmod +x "$work/qpai" && bin="$work/qpai" || { echo "cannot unpack $bin"; exit 2; }
fi
# CUDA's libraries from the Python packages where the system has none
# (cuBLAS, cuRAND, NVRTC, the runtime), plus any the caller names.
libs=$(python3 -c '
import glob, os, site
dirs = set()
for s in site.getsitepackages():
    dirs.update(os.path.dirname(p) for p in glob.glob(os.path.join(s, "nvidia", "**", "libcublas.so.*"), recursive=True))
    dirs.update(os.path.dirname(p) for p in glob.glob(os.path.join(s, "nvidia", "**", "libnvrtc.so.*"), recursive=True))
    dirs.update(os.path.dirname(p) for p in glob.glob(os.path.join(s, "nvidia", "**", "libcurand.so.*"), recursive=True))
    dirs.update(os.path.dirname(p) for p in glob.glob(os.path.join(s, "nvidia", "**", "libcudart.so.*"), recursive=True))
print(":".join(sorted(dirs)))' 2>/dev/null)
export LD_LIBRARY_PATH="${QPAI_CUDA_LIBS:+$QPAI_CUDA_LIBS:}$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export QPAI_DATA_DIR="$work/data" RUST_LOG="${RUST_LOG:-warn}"
qpai() { "$bin" --device "$1" "${@:2}"; }
# QPAI_GPU_TENSOR_OPS=1 with DEVICE cpu: the device runs take the
# accelerator path (candle tensor ops) on the CPU, to try this script.
tensor_ops=(); [ -n "${QPAI_GPU_TENSOR_OPS:-}" ] && tensor_ops=(--tensor-ops)

say "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
say ""
if command -v nvidia-smi >/dev/null; then
  say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader)"
fi
say "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) threads"
say "binary: $(basename "$1"), $(stat -c %s "$bin") bytes; device: $device"
ldd "$bin" | grep -E "cuda|cublas|curand|nvrtc|not found" | sed 's/^/    /' | tee -a "$out/ldd.txt"
say ""

# --- 1. the committed fixtures ----------------------------------------------
python3 - "$work" <<'EOF'
import json, sys
work = sys.argv[1]
tiny = json.load(open("tests/fixtures/tiny/logits.json"))
for name, model in tiny["models"].items():
    json.dump([{"ids": c["ids"]} for c in model["cases"]], open(f"{work}/prompts-{name}.json", "w"))
lora = json.load(open("tests/fixtures/lora/logits.json"))
p = lora["prompts"]
json.dump([{"ids": ids} for ids in p], open(f"{work}/prompts-lora.json", "w"))
d = "tests/fixtures/lora/"
rows = [(0, "r4-all"), (1, "r4-all"), (2, "r8-rslora"), (0, "r8-rslora"), (2, "r4-all"), (0, None)]
json.dump([{"ids": p[i], **({"adapter": d + a} if a else {})} for i, a in rows],
          open(f"{work}/prompts-mixed.json", "w"))
# The references of those rows, in order.
json.dump({"cases": [lora["adapters"][a]["unmerged"][i] if a else lora["base_logits"][i] for i, a in rows]},
          open(f"{work}/reference-mixed.json", "w"))
EOF
check() { # LABEL OURS REFERENCE TOLERANCE [compare.py options]; counts its own failure
  python3 scripts/gpu/compare.py "$@" | tee -a "$report" || failures=$((failures + 1))
  return 0
}
# A qpai run that fails is a failure too: `qpai ... && check ... || failed LABEL`.
failed() { say "| $1 | qpai failed | | | | | FAIL |"; failures=$((failures + 1)); }
say "## Correctness: qpai on $device against the references"
say ""
say "| what | max abs gap | relative | top-1 | greedy | tolerance | |"
say "|---|---|---|---|---|---|---|"
for name in qwen2-bf16 mistral-f16 llama-bf16; do
  qpai "$device" logits "${tensor_ops[@]}" --model "tests/fixtures/tiny/$name" --dtype f32 --prompts "$work/prompts-$name.json" \
    --json "$out/tiny-$name-f32.json" && \
    check "tiny $name, f32, vs transformers f32" "$out/tiny-$name-f32.json" tests/fixtures/tiny/logits.json 2e-3 \
      --reference-cases "models.$name.cases" || failed "tiny $name, f32, vs transformers f32"
  native=${name#*-}
  qpai "$device" logits "${tensor_ops[@]}" --model "tests/fixtures/tiny/$name" --prompts "$work/prompts-$name.json" \
    --json "$out/tiny-$name-native.json" && \
    check "tiny $name, $native on $device, vs transformers f32" "$out/tiny-$name-native.json" \
      tests/fixtures/tiny/logits.json 0.1 --reference-cases "models.$name.cases" || failed "tiny $name, $native on $device, vs transformers f32"
done
for file in llama-f32 llama-q8_0; do
  tolerance=2e-3; [ "$file" = llama-q8_0 ] && tolerance=0.3
  qpai "$device" logits "${tensor_ops[@]}" --model "tests/fixtures/tiny/$file.gguf" --prompts "$work/prompts-lora.json" \
    --json "$out/tiny-$file.json" && \
    check "tiny $file.gguf vs transformers f32" "$out/tiny-$file.json" tests/fixtures/lora/logits.json \
      "$tolerance" --reference-cases base_logits || failed "tiny $file.gguf vs transformers f32"
  qpai cpu logits --model "tests/fixtures/tiny/$file.gguf" --prompts "$work/prompts-lora.json" \
    --json "$out/tiny-$file-cpu.json" && \
    check "tiny $file.gguf, $device vs qpai's CPU decoder" "$out/tiny-$file.json" "$out/tiny-$file-cpu.json" "$tolerance" || failed "tiny $file.gguf, $device vs qpai's CPU decoder"
done
for base in tests/fixtures/tiny/llama-f32.gguf tests/fixtures/tiny/llama-bf16; do
  label=$(basename "$base")
  dtype=(); [[ "$base" == *bf16 ]] && dtype=(--dtype f32)
  qpai "$device" logits "${tensor_ops[@]}" --model "$base" "${dtype[@]}" --prompts "$work/prompts-mixed.json" \
    --json "$out/lora-mixed-$label.json" && \
    check "$label + r4 / r8 / none unmerged, mixed in one batch, vs PEFT" "$out/lora-mixed-$label.json" \
      "$work/reference-mixed.json" 2e-3 || failed "$label + r4 / r8 / none unmerged, mixed in one batch, vs PEFT"
  for adapter in r4-all r8-rslora; do
    qpai "$device" logits "${tensor_ops[@]}" --model "$base" "${dtype[@]}" --merge "tests/fixtures/lora/$adapter" \
      --prompts "$work/prompts-lora.json" --json "$out/lora-merged-$label-$adapter.json" && \
      check "$label + $adapter merged vs PEFT merged" "$out/lora-merged-$label-$adapter.json" \
        tests/fixtures/lora/logits.json 2e-3 --reference-cases "adapters.$adapter.merged" || failed "$label + $adapter merged vs PEFT merged"
  done
done

# --- 2. a full-size model ---------------------------------------------------
if [ -n "${QPAI_GPU_SKIP_FULL:-}" ]; then
  say ""; say "(full-size model skipped: QPAI_GPU_SKIP_FULL)"
else
  python3 scripts/gpu/make_models.py "$work" > "$out/make_models.log" 2>&1 || { failures=$((failures + 1)); tail -5 "$out/make_models.log"; }
  python3 -c "
import json; c = json.load(open('$work/smollm2-shape-logits.json'))['cases']
json.dump([{'ids': x['ids']} for x in c], open('$work/prompts-full.json', 'w'))"
  ref="$work/smollm2-shape-logits.json"
  # f32 over 30 layers in another summation order than torch's: the first
  # H200 run measured 2.8e-3 (1.4e-3 of the largest logit) where the 2-layer
  # fixtures' 2e-3 had been assumed; 5e-3 is the bound from then on.
  for variant in "smollm2-shape --dtype f32|5e-3" "smollm2-shape|0.25" "smollm2-shape-f32.gguf|5e-3" "smollm2-shape-q8_0.gguf|0.5"; do
    spec=${variant%|*}; tolerance=${variant#*|}
    model=${spec%% *}; extra=(); [[ "$spec" == *" "* ]] && read -ra extra <<<"${spec#* }"
    qpai "$device" logits "${tensor_ops[@]}" --model "$work/$model" "${extra[@]}" --prompts "$work/prompts-full.json" \
      --json "$out/full-$model${extra[1]:+-${extra[1]}}.json" && \
      check "SmolLM2-135M shape, $spec, vs transformers f32 on the GPU" \
        "$out/full-$model${extra[1]:+-${extra[1]}}.json" "$ref" "$tolerance" || failed "SmolLM2-135M shape, $spec, vs transformers f32 on the GPU"
  done
  qpai cpu logits --model "$work/smollm2-shape-q8_0.gguf" --prompts "$work/prompts-full.json" \
    --json "$out/full-q8_0-cpu.json" && \
    check "SmolLM2-135M shape Q8_0, $device vs qpai's CPU decoder" "$out/full-smollm2-shape-q8_0.gguf.json" \
      "$out/full-q8_0-cpu.json" 0.5 || failed "SmolLM2-135M shape Q8_0, $device vs qpai's CPU decoder"
fi
say ""
say "correctness failures: $failures"

# --- 3. the OpenAI client against qpai serve --------------------------------
model_dir="$work/smollm2-shape"
if [ -d "$model_dir" ]; then
  say ""; say "## OpenAI client tests against qpai serve --device $device"
  "$bin" --device "$device" serve --model "$model_dir" --embedding-model "$work/bert-shape" --port 18090 \
    --max-running 64 > "$out/serve.log" 2>&1 &
  server=$!
  get() { python3 -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:18090$1').read().decode())"; }
  for _ in $(seq 120); do get /ready >/dev/null 2>&1 && break; sleep 1; done
  get /v1/models > "$out/models.json"
  say "/v1/models: $(python3 -c "import json; print([(m['id'], m.get('device')) for m in json.load(open('$out/models.json'))['data']])")"
  # Embeddings (candle's BERT on the device) against transformers.
  python3 - "$work" <<'EOF' 2>&1 | tee -a "$report" || failures=$((failures + 1))
import json, sys, urllib.request
work = sys.argv[1]
ref = json.load(open(f"{work}/bert-shape-embeddings.json"))
body = json.dumps({"model": f"{work}/bert-shape", "input": ref["texts"]}).encode()
request = urllib.request.Request("http://127.0.0.1:18090/v1/embeddings", body, {"content-type": "application/json"})
data = json.load(urllib.request.urlopen(request))["data"]
gap = max(abs(a - b) for d, want in zip(data, ref["embeddings"]) for a, b in zip(d["embedding"], want))
cos = min(sum(a * b for a, b in zip(d["embedding"], want)) for d, want in zip(data, ref["embeddings"]))
print(f"embeddings (BERT shape, random weights) vs transformers: max gap {gap:.2e}, min cosine {cos:.6f}")
sys.exit(0 if gap < 1e-3 else 1)
EOF
  QPAI_BASE_URL=http://127.0.0.1:18090/v1 QPAI_MODEL=smollm2-shape timeout 120 python3 -m pytest -q \
    tests/python/test_openai_client.py -p no:cacheprovider \
    -k "not embeddings and not grounded and not rag and not adapter and not site and not test_completions" 2>&1 | tail -4 | tee -a "$report"
  # Aggregate tokens/s at 1, 16 and 64 streams, through HTTP.
  for level in "1 16" "16,64 128"; do
    qpai "$device" bench-serve --url http://127.0.0.1:18090/v1 --model smollm2-shape --concurrency "${level% *}" \
      --requests "${level#* }" --prompt-tokens 256 --output-tokens 128 --min-token-id 3 --max-token-id 500 \
      --label "qpai serve --device $device" --json "$out/bench-serve-${level% *}.json" 2>&1 | tail -6 | tee -a "$report"
  done
  kill "$server"; wait "$server" 2>/dev/null
fi

# --- 4. speed ------------------------------------------------------------------
say ""; say "## Speed"
if [ "$device" = cuda ]; then
  python3 -c "
import torch
x = torch.empty(2 << 30, dtype=torch.uint8, device='cuda'); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
torch.cuda.synchronize(); s.record()
for _ in range(10): y.copy_(x)
e.record(); torch.cuda.synchronize()
print(f'GPU copy bandwidth (read + write): {2 * 10 * x.numel() / (s.elapsed_time(e) / 1e3) / 1e9:.0f} GB/s')" | tee -a "$report"
fi
for model in smollm2-shape smollm2-shape-q8_0.gguf; do
  [ -e "$work/$model" ] || continue
  for streams in 16 64; do
    qpai "$device" bench --model "$work/$model" --prompt-tokens 256 --decode-tokens 128 --runs 3 \
      --concurrency "$streams" --json "$out/bench-$device-$model-$streams.json" 2>&1 | tail -2 | tee -a "$report"
  done
done
if [ "$device" = cuda ] && [ -e "$work/smollm2-shape-q8_0.gguf" ] && [ -z "${QPAI_GPU_SKIP_CPU_BENCH:-}" ]; then
  for streams in 16 64; do
    qpai cpu bench --model "$work/smollm2-shape-q8_0.gguf" --prompt-tokens 256 --decode-tokens 64 --runs 2 \
      --concurrency "$streams" --json "$out/bench-cpu-q8_0-$streams.json" 2>&1 | tail -2 | tee -a "$report"
  done
fi
say ""; say "done; correctness failures: $failures"
exit $((failures > 0))
