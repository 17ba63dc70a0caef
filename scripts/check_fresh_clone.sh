#!/usr/bin/env bash
# Tries the repository as a new user would: clones the committed HEAD into an empty directory
# (so no ../shared or other sibling is beside it), then runs the README's two commands there:
# scripts/demo.sh (must serve and print generated text) and scripts/test.sh (every test; none may
# skip except GPU cases without a device). .ci/run runs this. Uncommitted changes are not tried.
#   scripts/check_fresh_clone.sh [WORK_DIR]   (default: a new temporary directory, removed after)
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-}
if [ -z "$work" ]; then
  work=$(mktemp -d /tmp/lorcserve-fresh.XXXXXX)
  trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work"
[ -z "$(ls -A "$work")" ] || { echo "check_fresh_clone: $work is not empty" >&2; exit 1; }
clone="$work/lorcserve"
git clone -q --no-local "$src" "$clone"
cd "$clone"
echo "== fresh clone of $(git rev-parse --short HEAD) in $clone (siblings: $(ls -A "$work" | tr '\n' ' '))"

echo "== scripts/demo.sh"
demo_t0=$SECONDS
bash scripts/demo.sh 2>&1 | tee "$work/demo.log"
# test.sh's last line repeats it (CI keeps only the end of the output).
export LORC_CHECK_DEMO_S=$((SECONDS - demo_t0))
echo "== scripts/demo.sh took ${LORC_CHECK_DEMO_S} s"
# The demo must have generated text: the streaming client prints the request's usage last.
grep -q "completion_tokens" "$work/demo.log" || grep -q "finish_reason" "$work/demo.log" ||
  { echo "check_fresh_clone: demo printed no completed generation" >&2; exit 1; }

echo "== scripts/test.sh"
bash scripts/test.sh 2>&1 | tee "$work/test.log"
# ctest lists skipped tests as "... ***Skipped"; only GPU cases may skip (for want of a device).
skipped=$(grep -E '\*\*\*Skipped' "$work/test.log" | grep -viE 'cuda|nccl|gpu' || true)
if [ -n "$skipped" ]; then
  printf 'check_fresh_clone: tests skipped that must run on a CPU-only clone:\n%s\n' "$skipped" >&2
  exit 1
fi
echo "check_fresh_clone: demo served and generated; every test ran (GPU cases aside)"
