#!/usr/bin/env bash
# Runs every qpai test. Sets up what the tests need first (all cached, so a
# second run only checks):
#   - Debian packages: python3-venv, protobuf-compiler, chromium (apt);
#   - a Python venv with the official openai client, pytest and the torch-free
#     reference tools (scripts/reference/requirements-light.txt);
#   - the catalog models, pulled and sha256-verified by `qpai models pull`;
#   - a float32 safetensors copy of SmolLM2, exported from its GGUF by
#     scripts/reference/export_safetensors.py (the safetensors loader's test input);
#   - a private PostgreSQL (scripts/postgres.sh) for the ledger's PostgreSQL tests.
# Then `cargo test` (unit tests + the single integration-test binary).
set -euo pipefail
cd "$(dirname "$0")/.."

# The clone's target/, where README's `cargo run -- serve` builds too, so
# the two commands share one build; .ci/run points it at ~/.cache/qpai-target.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

# Debian packages a fresh machine lacks: Python's venv module (shipped
# separately), protoc (lance builds its protobuf definitions), and Chromium
# (the eval report's test renders the HTML report headless).
missing=()
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -q && $sudo apt-get install -y -q "${missing[@]}"
fi
export QPAI_DATA_DIR="${QPAI_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/qpai}"
venv="${QPAI_TEST_VENV:-$HOME/.cache/qpai-venv}"

requirements=(tests/python/requirements.txt scripts/reference/requirements-light.txt)
stamp="$venv/.requirements.sha256"
wanted=$(cat "${requirements[@]}" | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "== setting up the test venv in $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q \
    $(printf -- '-r %s ' "${requirements[@]}")
  echo "$wanted" > "$stamp"
fi
export QPAI_TEST_PYTHON="$venv/bin/python"

echo "== building"
cargo build --tests
qpai="$CARGO_TARGET_DIR/debug/qpai"

echo "== models"
"$qpai" models pull smollm2-135m-instruct gemma3-270m all-minilm-l6-v2 all-minilm-l6-v2-int8

copy="$QPAI_DATA_DIR/test-fixtures/smollm2-135m-f32"
if [ ! -f "$copy/model.safetensors" ]; then
  echo "== exporting the f32 safetensors copy of SmolLM2"
  gguf="$QPAI_DATA_DIR/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
  rm -rf "$copy.partial"
  "$QPAI_TEST_PYTHON" scripts/reference/export_safetensors.py "$gguf" "$copy.partial"
  rm -rf "$copy" && mv "$copy.partial" "$copy"
fi
export QPAI_TEST_SAFETENSORS_DIR="$copy"

echo "== PostgreSQL"
export QPAI_TEST_DATABASE_URL="${QPAI_TEST_DATABASE_URL:-$(scripts/postgres.sh)}"

echo "== tests"
RUST_BACKTRACE="${RUST_BACKTRACE:-0}" cargo test "$@"
