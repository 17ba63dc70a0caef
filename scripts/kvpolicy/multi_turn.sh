#!/usr/bin/env bash
# The multi-turn four-facts check (eval/eval.h EvalMultiTurnPasskey) with each policy of
# configs.txt: `lorcserve eval --multi-turn --json` per config, one JSON each in OUT/NAME.json
# (accuracy per turn: multi_turn_acc). LoRC rows need --lorc-model (a compressed model
# directory, e.g. the sweep's OUT/models/c*); without it they are skipped.
#   scripts/kvpolicy/multi_turn.sh --lorcserve build/bin/lorcserve --model models/tiny-llama-a \
#       --out /tmp/kvpolicy-mt [--lorc-model DIR] [--limit N] [--only REGEX] [--eval-args "ARGS"]
#       [--configs FILE]   (default: configs.txt here; configs_prefill.txt: the after-prompt rows)
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="" model="" out="" lorc="" limit="" only="" extra="" configs="$here/configs.txt"
while (($#)); do
  case "$1" in
    --lorcserve) bin="${2:?}"; shift 2 ;;
    --model) model="${2:?}"; shift 2 ;;
    --out) out="${2:?}"; shift 2 ;;
    --lorc-model) lorc="${2:?}"; shift 2 ;;
    --limit) limit="${2:?}"; shift 2 ;;
    --only) only="${2:?}"; shift 2 ;;
    --eval-args) extra="${2?}"; shift 2 ;;
    --configs) configs="${2:?}"; shift 2 ;;
    *) echo "multi_turn.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n "$bin" && -n "$model" && -n "$out" ]] || { echo "multi_turn.sh: needs --lorcserve, --model, --out" >&2; exit 2; }
mkdir -p "$out"
status=0
while IFS='|' read -r name compress eval_args; do
  [[ "$name" =~ ^[[:space:]]*(#|$) ]] && continue
  name="${name//[[:space:]]/}"
  [[ -n "$only" ]] && ! grep -Eq "$only" <<<"$name" && continue
  dir="$model"
  if [[ -n "${compress//[[:space:]]/}" ]]; then
    [[ -n "$lorc" ]] || continue
    dir="$lorc"
  fi
  [[ -f "$out/$name.json" ]] && continue
  # shellcheck disable=SC2086
  if "$bin" eval --model "$dir" --passkey "$model/eval_passkey.jsonl" --multi-turn --json \
      --threads 1 ${limit:+--limit "$limit"} $eval_args $extra >"$out/$name.tmp" 2>"$out/$name.log"; then
    mv "$out/$name.tmp" "$out/$name.json"
    echo "[$name] $(grep -o '"multi_turn_acc":\[[^]]*\]' "$out/$name.json")" >&2
  else
    echo "[$name] failed: $(tail -1 "$out/$name.log")" >&2
    status=1
  fi
done <"$configs"
exit $status
