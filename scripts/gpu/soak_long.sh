#!/usr/bin/env bash
# The 10,000-request soak with faults (docs/RELIABILITY.md) on the GPU machine's CPUs (no GPU
# used): bench/src/soak_faults.cc against a TP=2 CPU server of this tree. The binaries come as
# SOAK_BUNDLE (default .gpu-soak/soak.tar.xz, an ignored carry folder): /work/shared/device/
# bundle-libs.sh over build/bin/soak_faults and build/bin/lorcserve, stripped, xz (libopenblas
# left out: the GPU host has its own). Arguments go to soak_faults after --lorcserve and --model
# (default: the CI run's pool and lengths, 10,000 requests). $OUT gets host.txt, soak.txt (its
# table, JSON line and any INVARIANT line) and soak-server.log.xz (the server's log).
set -uo pipefail
cd "$(dirname "$0")/../.."
B=/tmp/lorc-soak-bin
mkdir -p $B && python3 -c "import tarfile,sys; tarfile.open(sys.argv[2]).extractall(sys.argv[1])" $B "${SOAK_BUNDLE:-.gpu-soak/soak.tar.xz}"
export LD_LIBRARY_PATH=$B:$(cat $B/cuda-lib-path)
# The fixture's weights travel compressed (the unpacked file is ignored by git).
[ -f models/tiny-llama-a/model.safetensors ] || (cd models/tiny-llama-a && cmake -E tar xf model.safetensors.tar.zst)
(nproc; lscpu | grep -E "Model name|^CPU\(s\)"; date -u) > $OUT/host.txt
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--requests 10000 --num-blocks 32 --long-prompt-max 160 --max-tokens-max 16 --ref-tokens 12)
timeout "${SOAK_TIMEOUT_S:-560}" $B/soak_faults --lorcserve $B/lorcserve --model models/tiny-llama-a \
  --server-log /tmp/soak-server.log "${args[@]}" > $OUT/soak.txt 2>&1
echo "soak_faults rc=$? at $(date -u +%T)" >> $OUT/soak.txt
xz -9 -c /tmp/soak-server.log > $OUT/soak-server.log.xz 2>/dev/null || true
