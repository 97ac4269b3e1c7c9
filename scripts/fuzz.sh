#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ and prints a table of executions and
# findings (docs/reliability.md, "Fuzzing").
#
#   scripts/fuzz.sh [--runs N] [--seconds S] [--jobs J] [TARGET...]
#
# Each target runs until N executions (default 1,000,000) or S seconds
# (default 1,800), whichever comes first, J targets at a time (default: the
# number of cores), with libFuzzer's limits: 1 s per input, 256 MB of RSS and
# no single allocation above it. The committed seeds in fuzz/corpus/TARGET are
# read, never written: what the fuzzer adds goes to
# $CARGO_TARGET_DIR/fuzz-corpus/TARGET, crashes to fuzz/artifacts/TARGET
# (move a fixed one to fuzz/regressions/TARGET; the replay test runs it).
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=1000000
seconds=1800
jobs=$(nproc)
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(ls fuzz/fuzz_targets | sed 's/\.rs$//')
fi

# Errors carry no backtraces, as `qpai`'s main sets (telemetry.rs): with
# RUST_BACKTRACE=1 alone candle renders one into every error, and the
# symbol cache that fills grows the process by about a kilobyte per input.
export RUST_LIB_BACKTRACE=0

# A target dir of its own: fuzz builds are instrumented, nothing is shared
# with the main build.
export CARGO_TARGET_DIR="${QPAI_FUZZ_TARGET_DIR:-$HOME/.cache/qpai-fuzz-target}"
logs="$CARGO_TARGET_DIR/fuzz-logs"
mkdir -p "$logs"

echo "== building ${#targets[@]} targets"
(cd fuzz && cargo +nightly fuzz build --sanitizer none)

run_one() {
  local target=$1 work="$CARGO_TARGET_DIR/fuzz-corpus/$1"
  mkdir -p "$work" "fuzz/artifacts/$target"
  (cd fuzz && cargo +nightly fuzz run --sanitizer none "$target" "$work" "corpus/$target" -- \
    -runs="$runs" -max_total_time="$seconds" -timeout=1 -rss_limit_mb=256 \
    -print_final_stats=1) > "$logs/$target.log" 2>&1 || true
  echo "done $target"
}
export -f run_one
export runs seconds logs
printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one {}'

echo
echo "| target | executions | seconds | exec/s | corpus | findings |"
echo "|---|---:|---:|---:|---:|---:|"
for target in "${targets[@]}"; do
  log="$logs/$target.log"
  executed=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo 0)
  speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo 0)
  took=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -1 | grep -o 'in [0-9]*' | grep -o '[0-9]*' || echo -)
  corpus=$(ls "$CARGO_TARGET_DIR/fuzz-corpus/$target" | wc -l)
  findings=$(ls "fuzz/artifacts/$target" 2>/dev/null | wc -l)
  echo "| $target | $executed | $took | $speed | $corpus | $findings |"
done
