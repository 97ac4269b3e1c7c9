#!/usr/bin/env bash
# The routing calibration of docs/eval-calibration.md, end to end:
#   1. a second qpai serves Gemma 3 on port 18431: the "remote" route;
#   2. per task, every route answers every case (both splits);
#   3. `qpai eval calibrate` writes each route's score on the calibration
#      split into a copy of the catalog, with the task's floor at 95% of the
#      best route's score;
#   4. `auto` with the task tag answers the held-out split;
#   5. table.py compares auto with each route on the held-out split.
# Needs the pg15 site ingested (docs/rag.md) under $QPAI_RAG_URI.
#
#   CARGO_TARGET_DIR=~/.cache/qpai-target cargo build
#   QPAI_RAG_URI=/tmp/eval-rag bash eval/calibration/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

qpai="${QPAI:-${CARGO_TARGET_DIR:-$HOME/.cache/qpai-target}/debug/qpai}"
out="${OUT:-eval/results/calibration}"
concurrency="${CONCURRENCY:-8}"
export QPAI_RAG_URI="${QPAI_RAG_URI:-/tmp/eval-rag}"
data_dir="${QPAI_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/qpai}"
mkdir -p "$out"
catalog="$out/router.toml"
cp eval/calibration/router.toml "$catalog"

remote_dir=$(mktemp -d)
trap 'kill $remote 2>/dev/null; rm -rf "$remote_dir"' EXIT
QPAI_MODELS_DIR="$data_dir/models" "$qpai" --data-dir "$remote_dir" \
  serve --model gemma3-270m --embedding-model "" --port 18431 \
  > "$out/remote.log" 2>&1 &
remote=$!
for _ in $(seq 120); do
  curl -sf http://127.0.0.1:18431/v1/models | grep -q gemma3-270m && break
  sleep 1
done

# task tag | suite | the routes that serve it
tasks=(
  "house_style|house-style|smollm2 smollm2-house-style gemma3 remote-gemma3"
  "extraction|extraction|smollm2 smollm2-house-style gemma3 remote-gemma3"
  "glossary_rag|glossary-rag|smollm2 smollm2-house-style gemma3"
)
for entry in "${tasks[@]}"; do
  IFS='|' read -r tag name routes <<< "$entry"
  suite="eval/suites/task-$name.toml"
  model_flags=()
  for route in $routes; do model_flags+=(--model "$route"); done
  "$qpai" eval run "$suite" --out "$out/$name-routes" --router-config "$catalog" \
    --concurrency "$concurrency" "${model_flags[@]}"
  "$qpai" eval calibrate "$out/$name-routes/results.json" --task "$tag" \
    --group calibrate --floor-of-best 0.95 --router-config "$catalog" \
    | tee "$out/$name-calibration.md"
  "$qpai" eval run "$suite" --out "$out/$name-auto" --router-config "$catalog" \
    --concurrency "$concurrency" --model auto --group heldout
done
python3 eval/calibration/table.py "$out" | tee "$out/table.md"
