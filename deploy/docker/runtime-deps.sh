#!/usr/bin/env bash
# Lists what a binary needs at run time, for the Dockerfile's runtime stage: the Debian packages
# that own its shared libraries (one a line, on stdout), and copies the libraries no package owns
# (a CUDA toolkit unpacked by hand, say) into LIBDIR. The NVIDIA driver's libcuda is left out: the
# container runtime mounts the host's. Fails when a library is missing (ldd: not found).
# DLOPENED: libraries the binary loads itself at run time (dlopen), listed with what they link;
# lorcserve loads cuBLASLt so (backend/cublaslt_loader.h).
#   deploy/docker/runtime-deps.sh BINARY LIBDIR [DLOPENED...] > packages.txt
set -euo pipefail
bin=$1
libdir=$2
shift 2
mkdir -p "$libdir"
# Each by the name the binary asks dlopen for (its soname, copied under that name when no package
# owns it), with its own libraries resolved.
for extra in "$@"; do
  [ -f "$extra" ] || { echo "runtime-deps: $extra (loaded at run time) not found" >&2; exit 1; }
done
for f in "$bin" "$@"; do
  if ldd "$f" | grep -v 'libcuda\.so' | grep -q 'not found'; then
    ldd "$f" | grep 'not found' >&2
    echo "runtime-deps: $f has unresolved libraries" >&2
    exit 1
  fi
done
{ ldd "$bin" | awk '$3 ~ /^\// {print $3}'; for extra in "$@"; do echo "$extra"; ldd "$extra" | awk '$3 ~ /^\// {print $3}'; done; } | while read -r lib; do
  case "$(basename "$lib")" in libcuda.so*) continue ;; esac
  real=$(readlink -f "$lib")
  pkg=""
  # usrmerge: dpkg may have recorded /lib/... or /usr/lib/... for the same file.
  for p in "$lib" "$real" "/usr$lib" "/usr$real" "${lib#/usr}" "${real#/usr}"; do
    pkg=$(dpkg-query -S "$p" 2>/dev/null | head -1 | cut -d: -f1) && [ -n "$pkg" ] && break
  done
  if [ -n "$pkg" ]; then
    echo "$pkg"
  else
    cp -L -n "$lib" "$libdir/"
    echo "runtime-deps: $lib belongs to no package: copied" >&2
  fi
done | sort -u
