#!/usr/bin/env bash
# Builds everything HERE (a build machine with nvcc; no GPU needed) and packs lorcserve, the CUDA
# and NCCL test binaries and the benchmarks, with the shared libraries the GPU host lacks, into
# .gpu/bundle.tar.xz. scripts/gpu/check.sh unpacks and runs them on the GPU host (which needs no
# compiler: the device machines have the CUDA runtime, cuBLAS, NCCL and Python only).
#
#   scripts/gpu/pack.sh        # then carry the checkout with .gpu/ to the GPU host
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/build.sh
bins=(build/bin/lorcserve)
for f in build/tests/*cuda*_test build/tests/*cublas*_test build/tests/*nccl*_test build/bin/*_bench; do
  [ -x "$f" ] && bins+=("$f")
done
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# The lent H200 machines' helper (copies the non-CUDA libraries, records where CUDA lives there).
BUNDLE_LIBS=${BUNDLE_LIBS:-../shared/device/bundle-libs.sh}
if [ -f "$BUNDLE_LIBS" ]; then
  bash "$BUNDLE_LIBS" "$stage" "${bins[@]}" >/dev/null
else
  cp "${bins[@]}" "$stage/"  # the GPU host must then have this machine's libraries installed
fi
mkdir -p .gpu
tar cJf .gpu/bundle.tar.xz -C "$stage" .
echo "packed ${#bins[@]} binaries into .gpu/bundle.tar.xz ($(du -h .gpu/bundle.tar.xz | cut -f1))"
