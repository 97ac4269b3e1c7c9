#!/usr/bin/env bash
# Builds qpai with CUDA (candle's `cuda` feature) on a machine with no GPU and
# no CUDA toolkit: the toolkit comes from NVIDIA's PyPI wheels, installed into
# a cache directory, and a link-time stub stands in for the driver library.
#
#   scripts/build-cuda.sh [--caps 80,90] [--out DIR]   the binary, stripped and compressed
#   scripts/build-cuda.sh --check                      only `cargo check` the feature (CI)
#
# --caps: the compute capabilities to build machine code for (80: A100,
#   89: L4/L40, 90: H100/H200). candle compiles most kernels to PTX, and PTX
#   for the lowest capability also runs on newer GPUs (the driver compiles it
#   at load); its statically linked kernels (quantized matmuls, MoE) get SASS
#   for every capability given, plus PTX for the highest.
# The binary is a GPU serving build: no default features, so no LanceDB (site
# stores are refused with an error naming the `lance` feature) and no ONNX
# Runtime. It needs, on the GPU machine, a driver for CUDA 13 and the CUDA 13
# libraries (libcudart, libcublas, libcublasLt, libcurand, libnvrtc), e.g.
# from the same wheels or a CUDA runtime image.
set -euo pipefail
cd "$(dirname "$0")/.."

caps=80,90
out=dist
mode=build
while [ $# -gt 0 ]; do
  case "$1" in
    --caps) caps="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --check) mode=check; shift ;;
    *) echo "usage: $0 [--caps 80,90] [--out DIR] [--check]" >&2; exit 2 ;;
  esac
done

# CUDA 13.0: what the H200 machines' driver (580) and PyTorch (cu130) use.
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
# Linking also needs the libraries themselves (cuBLAS alone is 420 MB).
[ "$mode" = build ] && wheels+=(nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
                               nvidia-cuda-nvrtc==13.0.88)

cache="${QPAI_CUDA_CACHE:-$HOME/.cache/qpai-cuda}"
site="$cache/site-13.0"
stamp="$site/.wheels"
missing=()
for wheel in "${wheels[@]}"; do
  grep -qxF "$wheel" "$stamp" 2>/dev/null || missing+=("$wheel")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing the CUDA toolkit wheels into $site: ${missing[*]}"
  python3 -m pip install --disable-pip-version-check -q --no-deps --target "$site" \
    --upgrade "${missing[@]}"
  printf '%s\n' "${missing[@]}" >> "$stamp"
fi
cuda="$site/nvidia/cu13"

# The driver library is on the GPU machine only: link against a stub that
# defines every driver function cudarc declares, with the real library's
# soname, so the binary loads the real libcuda.so.1 at run time.
mkdir -p "$cuda/lib/stubs"
if [ ! -f "$cuda/lib/stubs/libcuda.so" ]; then
  echo "== making the libcuda stub"
  bindings=$(cargo metadata --format-version 1 --no-default-features --features cuda 2>/dev/null \
    | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')
  bindings="$(dirname "$bindings")/src/driver/sys/mod.rs"
  grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$bindings" | sort -u \
    | awk '{print "int " $4 "(void) { return 999; }"}' > "$cuda/lib/stubs/libcuda.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so" "$cuda/lib/stubs/libcuda.c"
fi
# The wheels ship versioned names only; the linker looks for libNAME.so.
for lib in "$cuda"/lib/lib*.so.*; do
  base="${lib%%.so.*}.so"
  [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
done

# nvcc with one -gencode per capability for machine code (candle's build asks
# for one); PTX is left at the capability it asks for, the lowest.
sorted=$(tr ',' '\n' <<<"$caps" | sort -n | tr '\n' ' ')
lowest=${sorted%% *}
highest=$(tr ' ' '\n' <<<"$sorted" | grep . | tail -1)
wrapper="$cache/nvcc-multi"
cat > "$wrapper" <<EOF
#!/usr/bin/env bash
ptx=0
for a in "\$@"; do [ "\$a" = --ptx ] && ptx=1; done
args=()
for a in "\$@"; do
  if [ \$ptx = 0 ] && [[ \$a == -gencode=arch=compute_*,code=sm_* ]]; then
    for cap in $sorted; do args+=("-gencode=arch=compute_\$cap,code=sm_\$cap"); done
    args+=("-gencode=arch=compute_$highest,code=compute_$highest")
  else
    args+=("\$a")
  fi
done
exec "$cuda/bin/nvcc" "\${args[@]}"
EOF
chmod +x "$wrapper"

export CUDA_HOME="$cuda" CUDA_PATH="$cuda" NVCC="$wrapper" CUDA_COMPUTE_CAP="$lowest"
# QPAI_TARGET_CPU: another x86-64 level than .cargo/config.toml's x86-64-v3.
[ -n "${QPAI_TARGET_CPU:-}" ] && export RUSTFLAGS="-C target-cpu=$QPAI_TARGET_CPU"
export PATH="$cuda/bin:$PATH"
# The linker (cc) finds -lcuda, -lcublas and the rest here.
export LIBRARY_PATH="$cuda/lib/stubs:$cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"

# A target dir of its own: the CUDA build's binary must not replace the
# default build's target/debug/qpai, which the tests run. The check shares
# it, so it reuses the kernels a build compiled (nvcc on every kernel is most
# of a cold CUDA build).
export CARGO_TARGET_DIR="${QPAI_CUDA_TARGET_DIR:-$HOME/.cache/qpai-cuda-target}"
if [ "$mode" = check ]; then
  echo "== cargo check --no-default-features --features cuda"
  cargo check --no-default-features --features cuda --lib --bins
  exit 0
fi
echo "== cargo build --no-default-features --features cuda (compute capabilities $caps)"
cargo build --no-default-features --features cuda --bin qpai
mkdir -p "$out"
name="qpai-cuda-sm${caps//,/-sm}"
strip -o "$out/$name" "$CARGO_TARGET_DIR/debug/qpai"
rm -f "$out/$name.xz"
xz -T0 -6 -k "$out/$name"
printf '%s: %s bytes, compressed %s bytes\n' "$out/$name" \
  "$(stat -c %s "$out/$name")" "$(stat -c %s "$out/$name.xz")"
