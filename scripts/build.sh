#!/usr/bin/env bash
# Configures and builds lorcserve into $BUILD_DIR (default build/). CUDA is enabled when nvcc is
# found (/usr/local/cuda/bin/nvcc or on PATH); set LORC_CUDA=OFF to skip it.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
# ccache, when installed, makes rebuilds (and builds in other worktrees) cheap.
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLORC_CUDA="${LORC_CUDA:-AUTO}" \
  -DLORC_SOAK_TEST="$([ "${LORC_SOAK:-0}" = 1 ] && echo ON || echo OFF)" "${launcher[@]}" ${LORC_CMAKE_ARGS:-} >/dev/null
# Targets: all by default, or those given as arguments (e.g. lorcserve).
cmake --build "$BUILD_DIR" -j "$JOBS" ${1:+--target "$@"}
