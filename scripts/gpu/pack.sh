#!/usr/bin/env bash
# Builds everything HERE (a build machine with nvcc; no GPU needed) and packs lorcserve, the CUDA
# and NCCL test binaries and the benchmarks, with the shared libraries the GPU host lacks, into
# .gpu/bundle.tar.xz. scripts/gpu/check.sh unpacks and runs them on the GPU host (which needs no
# compiler: the device machines have the CUDA runtime, cuBLAS, NCCL and Python only).
#
#   scripts/gpu/pack.sh        # then carry the checkout with .gpu/ to the GPU host
#   PACK_BINS="lorcserve worker_cuda_model_runner_test" scripts/gpu/pack.sh   # only these
#   PACK_OLD=/tmp/old/build-old/bin/lorcserve PACK_BINS=lorcserve scripts/gpu/pack.sh  # before/after
#
# The device carry holds 64 MiB with the tree (about 51 MiB of it tracked files), so the bundle
# must stay under ~12 MiB: binaries are stripped, compressed with xz -9e, and OpenBLAS (8 MB
# compressed with libgfortran) is replaced by a stand-in over netlib's reference BLAS
# (scripts/gpu/openblas_shim.c; the GPU host's CPU backend is only the parity tests' reference).
# All binaries together (PACK_BINS unset) exceed the limit: name those a device call needs.
set -euo pipefail
cd "$(dirname "$0")/../.."
bins=()
if [ -n "${PACK_BINS:-}" ]; then
  targets=()
  for n in $PACK_BINS; do  # a shared library by its file name: libkernel_trace.so is target kernel_trace
    case $n in lib*.so) t=${n#lib}; targets+=("${t%.so}") ;; *) targets+=("$n") ;; esac
  done
  bash scripts/build.sh "${targets[@]}"
  for n in $PACK_BINS; do  # programs (and shared libraries) land in build/bin, tests in build/tests
    if [ -f "build/bin/$n" ]; then bins+=("build/bin/$n"); else bins+=("build/tests/$n"); fi
  done
else
  bash scripts/build.sh
  bins=(build/bin/lorcserve)
  for f in build/tests/*cuda*_test build/tests/*cublas*_test build/tests/*nccl*_test build/tests/*all_reduce_ranks_test build/bin/*_bench; do
    [ -x "$f" ] && bins+=("$f")
  done
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# The lent H200 machines' helper (copies the non-CUDA libraries, records where CUDA lives there).
BUNDLE_LIBS=${BUNDLE_LIBS:-../shared/device/bundle-libs.sh}
if [ -f "$BUNDLE_LIBS" ]; then
  bash "$BUNDLE_LIBS" "$stage" "${bins[@]}" >/dev/null
else
  cp "${bins[@]}" "$stage/"  # the GPU host must then have this machine's libraries installed
fi
for b in "${bins[@]}"; do strip "$stage/$(basename "$b")"; done
# PACK_OLD: a lorcserve binary of an earlier commit, as lorcserve-old (check.sh phase versus; it
# must need no library the bundle lacks). Built e.g. in a worktree:
#   git worktree add /tmp/old REV && (cd /tmp/old && BUILD_DIR=build-old bash scripts/build.sh lorcserve)
if [ -n "${PACK_OLD:-}" ]; then
  cp "$PACK_OLD" "$stage/lorcserve-old" && strip "$stage/lorcserve-old"
fi
# The kernel tracer's CUPTI (bundle-libs.sh leaves CUDA's libraries to the host; carry this one).
if [ -f "$stage/libkernel_trace.so" ] && [ ! -f "$stage/libcupti.so.13" ]; then
  cupti=$(ldd "$stage/libkernel_trace.so" | awk '/libcupti/ {print $3}')
  if [ -f "$cupti" ]; then cp -L "$cupti" "$stage/"; else echo "warning: libcupti not found for the tracer" >&2; fi
fi
netlib=/usr/lib/x86_64-linux-gnu/blas/libblas.so.3
if [ -f "$stage/libopenblas.so.0" ] && [ -f "$netlib" ]; then
  rm -f "$stage/libopenblas.so.0"
  cp -L "$netlib" "$stage/libblas.so.3"
  cc -shared -fPIC -O2 -o "$stage/libopenblas.so.0" scripts/gpu/openblas_shim.c -Wl,-soname,libopenblas.so.0 \
    -Wl,--no-as-needed "$stage/libblas.so.3"
  # libgfortran / libquadmath came with OpenBLAS; drop them unless something else still needs them.
  for lib in libgfortran.so.5 libquadmath.so.0; do
    [ -f "$stage/$lib" ] || continue
    needed=0
    for f in "$stage"/*; do
      [ "$(basename "$f")" = "$lib" ] && continue
      readelf -d "$f" 2>/dev/null | grep -q "NEEDED.*\[$lib\]" && needed=1
    done
    [ "$needed" = 1 ] || rm -f "$stage/$lib"
  done
fi
mkdir -p .gpu
tar cf - -C "$stage" . | xz -9e -T2 > .gpu/bundle.tar.xz
echo "packed ${#bins[@]} binaries into .gpu/bundle.tar.xz ($(du -h .gpu/bundle.tar.xz | cut -f1))"
# What travels to a lent machine: the tracked files and the bundle (64 MiB together at most).
tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((tracked + $(stat -c %s .gpu/bundle.tar.xz)))
if [ "$total" -gt $((64 << 20)) ]; then
  echo "warning: the tracked files and the bundle come to $((total >> 20)) MiB, more than a lent machine's" \
       "64 MiB: name fewer binaries in PACK_BINS" >&2
fi
