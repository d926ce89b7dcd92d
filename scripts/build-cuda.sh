#!/usr/bin/env bash
# The cuda release binary, built on a machine without a GPU (../shared/gpu.md's recipe), into its own target
# folder so that target/release/t2 stays the CPU build. A cold build takes 20-25 minutes on 2 cores.
#
#   bash scripts/build-cuda.sh            -> target/cuda/release/t2 (then scripts/gpu-pack.sh)
#
# CUDA_COMPUTE_CAP=80 gives a binary that also runs on A100s (H100/H200 JIT its compute_80 PTX).
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP=../shared/gpu/setup-cuda-pip.sh
# The setup installs into PREFIX (its default is the same); CUDA_PIP=DIR picks another.
PREFIX=${CUDA_PIP:-$HOME/lab/cuda-pip}
CUDA=$PREFIX/cuda
[[ -f $SETUP ]] || { echo "error: $SETUP missing" >&2; exit 1; }
[[ -x $CUDA/bin/nvcc ]] || bash "$SETUP" "$PREFIX"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
export CUDA_HOME=$CUDA PATH=$CUDA/bin:$PATH CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000 CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2} CARGO_INCREMENTAL=0
build() { cargo build --release --locked -p t2 --features cuda; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The driver stub is made where cudarc's build looks, which exists only once cudarc has been fetched: a first
# build can fail to link (-lcuda). Run the setup again and relink.
if ! build 2>&1 | tee "$log"; then
    grep -q "unable to find library -lcuda" "$log" || exit 1
    echo "build-cuda: -lcuda missing on the first build; running the setup again and relinking"
    bash "$SETUP" "$PREFIX"
    build
fi
echo "built $CARGO_TARGET_DIR/release/t2"
