#!/usr/bin/env bash
# The token-level KV policy sweep (issue #17): scripts/lorc/sweep.sh over configs.txt here (LoRC
# compression once, shared by its configs), then report.py for the table and the plot.
#   scripts/kvpolicy/sweep.sh --lorcserve build/bin/lorcserve --model models/tiny-llama-a \
#       --out /tmp/kvpolicy [-j N] [--limit N] [--only REGEX] [--configs FILE]
# (--configs: default configs.txt here; configs_prefill.txt holds the after-prompt rows)
# --limit N: the first N perplexity windows and N pass-key prompts per filler length (default:
# all 48 windows and 200 prompts, ~250 s per config on an idle 2-core machine); every other
# argument goes to scripts/lorc/sweep.sh unchanged. Then:
#   scripts/kvpolicy/report.py OUT --md table.md --png docs/img/kv_policies.png
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
args=() limit=""
while (($#)); do
  case "$1" in
    --limit) limit="${2:?--limit needs a value}"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
extra=""
[[ -n "$limit" ]] && extra="--limit $limit"
exec "$here/../lorc/sweep.sh" --configs "$here/configs.txt" --share-compressed \
  ${extra:+--eval-args "$extra"} "${args[@]}"
