#!/usr/bin/env bash
# Build `road` with the `cuda` feature on a machine that has no CUDA toolkit and no GPU.
#
# Recipe (checked on an H200, driver 580 / CUDA 13.0; see README "GPU"):
#  1. pip-download the CUDA 13.0 toolkit wheels, pinned: unpinned ones come as 13.5+ and emit
#     PTX a 13.0 driver refuses. They go into a cache outside the repo.
#  2. Unzip them into one folder that works as CUDA_HOME (unzip drops execute bits; the
#     linker wants unversioned .so names).
#  3. The wheels carry no libcuda: generate a stub exporting every cu* driver symbol cudarc
#     declares. The real libcuda.so.1 is picked up on the GPU machine at run time.
#  4. cargo build --release --features cuda into its own target dir (the CPU build is untouched).
#
# Usage: scripts/build-cuda.sh [extra cargo args]
#   ROAD_CACHE        cache root (default ~/.cache/road-dii); the toolkit lands in $ROAD_CACHE/cuda
#   CARGO_TARGET_DIR  default target-cuda; the binary is $CARGO_TARGET_DIR/release/road
#   CUDA_COMPUTE_CAP  default 90 (Hopper: H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${ROAD_CACHE:-$HOME/.cache/road-dii}/cuda"
WHEELS="$CACHE/wheels"
ROOT="$CACHE/toolkit-13.0"
export CUDA_HOME="$ROOT/nvidia/cu13"
PINS=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
)

if [ ! -f "$ROOT/.complete" ]; then
  mkdir -p "$WHEELS"
  echo "== fetching CUDA 13.0 wheels into $WHEELS"
  python3 -m pip download -q --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --python-version 3.12 -d "$WHEELS" "${PINS[@]}"
  rm -rf "$ROOT" && mkdir -p "$ROOT"
  for w in "$WHEELS"/*.whl; do unzip -q -o "$w" -d "$ROOT"; done
  chmod +x "$CUDA_HOME"/bin/* "$CUDA_HOME"/nvvm/bin/* 2>/dev/null || true
  ( cd "$CUDA_HOME/lib"
    for l in cublas cublasLt cudart nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done
    ln -sf libcurand.so.10 libcurand.so )
  touch "$ROOT/.complete"
fi

# The libcuda stub: one empty function per cu* symbol of cudarc's driver bindings (found in
# cargo's registry, so cargo must have fetched the dependencies first).
STUB="$CUDA_HOME/lib/stubs/libcuda.so"
if [ ! -f "$STUB" ]; then
  cargo fetch -q
  SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs | sort -V | tail -1)
  mkdir -p "$CUDA_HOME/lib/stubs"
  grep -oE "pub (unsafe )?fn cu[A-Za-z0-9_]+" "$SYS" | awk '{print $NF}' | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$CUDA_HOME/lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB" "$CUDA_HOME/lib/stubs/libcuda_stub.c"
  echo "== libcuda stub: $(wc -l < "$CUDA_HOME/lib/stubs/libcuda_stub.c") symbols from $SYS"
fi

export CUDA_PATH="$CUDA_HOME" PATH="$CUDA_HOME/bin:$PATH" LD_LIBRARY_PATH="$CUDA_HOME/lib:${LD_LIBRARY_PATH:-}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"
nvcc --version | tail -2
cargo build --release --features cuda --bin road "$@"
echo "== built $CARGO_TARGET_DIR/release/road (needs libcuda, libcublas(Lt), libcurand, libcudart at run time)"
