#!/usr/bin/env bash
# The LoRC quality/bytes sweep (issue #9): for every config of a list, `lorcserve compress` into a
# temporary directory, then `lorcserve eval --json` on it, several configs at once; one result
# JSON per config. Needs only bash, coreutils and the lorcserve binary (no Python, no jq), so it
# runs on a device machine with the carried build. Usage: scripts/lorc/sweep.sh --help.
set -uo pipefail

usage() {
  cat <<'EOF'
Usage: sweep.sh --lorcserve BIN --model DIR --out DIR [--configs FILE] [-j N] [--threads N]
                [--eval-args "ARGS"] [--devices 0,1,...] [--tmp DIR] [--keep] [--only REGEX]
                [--share-compressed]
                [--dry-run]

  --lorcserve BIN   the lorcserve binary (e.g. build/bin/lorcserve)
  --model DIR       the source model directory (the fixture: models/tiny-llama-a)
  --out DIR         results: DIR/NAME.json per config, logs in DIR/logs/
  --configs FILE    the config list (default: configs.txt next to this script). One config a
                    line, three fields separated by '|':  NAME | COMPRESS ARGS | EVAL ARGS
                    An empty COMPRESS ARGS evaluates --model itself (uncompressed). '#' starts a
                    comment; blank lines are skipped. NAME: letters, digits, '.', '_', '-'.
  -j N              configs run at once (default 1)
  --threads N       CPU threads per job: OPENBLAS_NUM_THREADS for compress (whitening runs the
                    model on the CPU) and eval's --threads (default 1)
  --eval-args ARGS  appended to every eval, e.g. "--backend cuda" (default: none, the CPU);
                    eval gets --ppl/--passkey with --model's eval_ppl_windows.jsonl and
                    eval_passkey.jsonl unless the config or --eval-args give them
  --devices LIST    CUDA device ordinals handed out round-robin as eval's --device
  --tmp DIR         where compressed models are written (default: $TMPDIR or /tmp)
  --keep            keep the compressed models (in DIR/models/NAME) instead of deleting them
  --only REGEX      only configs whose NAME matches (grep -E)
  --share-compressed  configs with identical compress args compress once, into DIR/models/c<cksum>
                    (kept; a job waits for another's compression; remove DIR/models after an
                    interrupted run, its .lock would make later jobs wait)
  --dry-run         print the commands, run nothing

A config whose DIR/NAME.json exists is skipped (delete it to run it again). A failed config
leaves DIR/NAME.failed (the command and the end of its log) and no JSON; the exit code is 1
when any config failed. NAME.json is eval's JSON object plus: name, compress_args, eval_args,
lorc (the compressed model's lorc.json, or null), k_ranks, v_ranks (per layer, [] when
uncompressed), compress_wall_s, eval_wall_s, finished_utc.
EOF
}

die() { echo "sweep.sh: $*" >&2; exit 2; }

bin="" model="" out="" configs="$(dirname "$0")/configs.txt" jobs=1 threads=1 eval_extra=""
devices="" tmp="${TMPDIR:-/tmp}" keep=0 only="" dry=0 share=0
while (($#)); do
  case "$1" in
    --lorcserve) bin="${2:?--lorcserve needs a value}"; shift 2 ;;
    --model) model="${2:?--model needs a value}"; shift 2 ;;
    --out) out="${2:?--out needs a value}"; shift 2 ;;
    --configs) configs="${2:?--configs needs a value}"; shift 2 ;;
    -j) jobs="${2:?-j needs a value}"; shift 2 ;;
    -j*) jobs="${1#-j}"; shift ;;
    --threads) threads="${2:?--threads needs a value}"; shift 2 ;;
    --eval-args) eval_extra="${2?--eval-args needs a value}"; shift 2 ;;
    --devices) devices="${2:?--devices needs a value}"; shift 2 ;;
    --tmp) tmp="${2:?--tmp needs a value}"; shift 2 ;;
    --keep) keep=1; shift ;;
    --only) only="${2:?--only needs a value}"; shift 2 ;;
    --share-compressed) share=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
[[ -n "$bin" && -x "$bin" ]] || die "--lorcserve: '$bin' is not an executable"
[[ -n "$model" && -f "$model/config.json" ]] || die "--model: '$model' has no config.json"
[[ -n "$out" ]] || die "--out DIR is required"
[[ -f "$configs" ]] || die "--configs: '$configs' does not exist"
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "-j: '$jobs' is not a positive integer"
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || die "--threads: '$threads' is not a positive integer"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
model="$(cd "$model" && pwd)"
IFS=',' read -r -a device_list <<<"$devices"

trim() { local s="$1"; s="${s#"${s%%[![:space:]]*}"}"; printf '%s' "${s%"${s##*[![:space:]]}"}"; }
# A JSON string literal of $1 (backslash, quote, tab and control characters escaped).
jstr() {
  local s="$1"
  s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; s="${s//$'\t'/\\t}"; s="${s//$'\n'/\\n}"; s="${s//$'\r'/}"
  printf '"%s"' "$s"
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
# The ranks "a,b,c" of one key (k_rank / v_rank) of a lorc.json, in layer order.
ranks() { grep -o "\"$1\": *[0-9]*" "$2" | grep -o '[0-9]*$' | paste -sd, -; }

# Parse the config list: names[i], cargs[i], eargs[i].
names=() cargs=() eargs=()
lineno=0
while IFS= read -r line || [[ -n "$line" ]]; do
  lineno=$((lineno + 1))
  line="${line%%#*}"
  [[ -z "$(trim "$line")" ]] && continue
  IFS='|' read -r f_name f_compress f_eval f_extra <<<"$line"
  f_name="$(trim "$f_name")"
  [[ -z "${f_extra:-}" ]] || die "$configs:$lineno: more than three '|'-separated fields"
  [[ "$f_name" =~ ^[A-Za-z0-9._-]+$ ]] || die "$configs:$lineno: bad NAME '$f_name'"
  for n in "${names[@]}"; do [[ "$n" != "$f_name" ]] || die "$configs:$lineno: NAME '$f_name' repeats"; done
  [[ -n "$only" ]] && ! grep -qE -- "$only" <<<"$f_name" && continue
  names+=("$f_name"); cargs+=("$(trim "${f_compress:-}")"); eargs+=("$(trim "${f_eval:-}")")
done <"$configs"
((${#names[@]})) || die "no configs in $configs${only:+ matching '$only'}"

mkdir -p "$out/logs" || die "cannot create $out/logs"
out="$(cd "$out" && pwd)"

# One config: compress (when it has compress args), eval, write NAME.json. Runs in a subshell.
run_one() {
  local i="$1" name="${names[$1]}" c="${cargs[$1]}" e="${eargs[$1]}"
  local log_c="$out/logs/$name.compress.log" log_e="$out/logs/$name.eval.log"
  local dir="$model" cdir="" t0 t1 t2 rc dev_args=() c_args e_args
  read -r -a c_args <<<"$c"
  read -r -a e_args <<<"$e $eval_extra"
  # A compressed directory has no evaluation files: the source model's, unless given.
  local f
  for f in ppl:eval_ppl_windows.jsonl passkey:eval_passkey.jsonl; do
    if [[ " ${e_args[*]} " != *" --${f%%:*} "* && -f "$model/${f#*:}" ]]; then e_args+=("--${f%%:*}" "$model/${f#*:}"); fi
  done
  if ((${#device_list[@]})); then dev_args=(--device "${device_list[$((i % ${#device_list[@]}))]}"); fi
  fail() {
    { echo "$1"; echo "---- end of its log ----"; tail -n 30 "$2"; } >"$out/$name.failed"
    echo "[$name] FAILED: $1 (log: $2)" >&2
    [[ -n "$cdir" && $keep -eq 0 ]] && rm -rf "$cdir"
    return 1
  }
  t0="$(now)"
  if [[ -n "$c" && $share -eq 1 && $dry -eq 0 ]]; then
    # --share-compressed: configs with the same compress args share one kept directory; the
    # first job compresses (mkdir is the lock), the others wait for its .done (or .failed).
    local key
    key="$(printf '%s' "$c" | cksum | cut -d' ' -f1)"
    cdir="$out/models/c$key"
    mkdir -p "$out/models"
    if mkdir "$cdir.lock" 2>/dev/null; then
      local cmd=("$bin" compress --model "$model" --out "$cdir" --force "${c_args[@]}")
      if OPENBLAS_NUM_THREADS="$threads" "${cmd[@]}" >"$log_c" 2>&1; then touch "$cdir.done"
      else touch "$cdir.failed"; local fc="$cdir"; cdir=""; fail "${cmd[*]} exited $?" "$log_c"; rm -rf "$fc"; return 1; fi
    else
      while [[ ! -e "$cdir.done" && ! -e "$cdir.failed" ]]; do sleep 2; done
      [[ -e "$cdir.done" ]] || { cdir=""; fail "the shared compression of '$c' failed" /dev/null; return 1; }
    fi
    dir="$cdir"; cdir=""  # shared: never deleted here
  elif [[ -n "$c" ]]; then
    if ((dry)); then cdir="$tmp/lorc_sweep_${name}_XXXXXX"
    elif ((keep)); then cdir="$out/models/$name"; rm -rf "$cdir"; mkdir -p "$out/models"
    else cdir="$(mktemp -d "$tmp/lorc_sweep_${name}_XXXXXX")" || { fail "mktemp -d in $tmp failed" /dev/null; return 1; }
    fi
    local cmd=("$bin" compress --model "$model" --out "$cdir" "${c_args[@]}")
    if ((dry)); then echo "OPENBLAS_NUM_THREADS=$threads ${cmd[*]}"; else
      OPENBLAS_NUM_THREADS="$threads" "${cmd[@]}" >"$log_c" 2>&1 || { fail "${cmd[*]} exited $?" "$log_c"; return 1; }
    fi
    dir="$cdir"
  fi
  t1="$(now)"
  local cmd=("$bin" eval --model "$dir" --json --threads "$threads" "${dev_args[@]}" "${e_args[@]}")
  if ((dry)); then echo "${cmd[*]} > $out/$name.json"; return 0; fi
  local json
  json="$("${cmd[@]}" 2>"$log_e")"; rc=$?
  json="$(grep '^{' <<<"$json" | tail -n 1)"
  ((rc == 0)) || { fail "${cmd[*]} exited $rc" "$log_e"; return 1; }
  [[ "$json" == "{"*"}" ]] || { fail "${cmd[*]} printed no JSON object" "$log_e"; return 1; }
  t2="$(now)"
  local lorc="null" kr="" vr=""
  if [[ -f "$dir/lorc.json" ]]; then
    lorc="$(tr -d '\n' <"$dir/lorc.json")"; kr="$(ranks k_rank "$dir/lorc.json")"; vr="$(ranks v_rank "$dir/lorc.json")"
  fi
  local tail
  tail="$(printf ',"name":%s,"compress_args":%s,"eval_args":%s,"lorc":%s,"k_ranks":[%s],"v_ranks":[%s],"compress_wall_s":%s,"eval_wall_s":%s,"finished_utc":%s}' \
    "$(jstr "$name")" "$(jstr "$c")" "$(jstr "$(trim "$e $eval_extra")")" "$lorc" "$kr" "$vr" \
    "$(elapsed "$t0" "$t1")" "$(elapsed "$t1" "$t2")" "$(jstr "$(date -u +%Y-%m-%dT%H:%M:%SZ)")")"
  printf '%s%s\n' "${json%\}}" "$tail" >"$out/$name.json.tmp" && mv "$out/$name.json.tmp" "$out/$name.json"
  rm -f "$out/$name.failed"
  [[ -n "$cdir" && $keep -eq 0 ]] && rm -rf "$cdir"
  local ppl pk
  ppl="$(grep -o '"ppl":[0-9.eE+-]*' <<<"$json" | head -n 1)"
  pk="$(grep -o '"passkey_acc":{[^}]*}' <<<"$json")"
  echo "[$name] done: ${ppl:-no ppl} ${pk:-no passkey} (compress $(elapsed "$t0" "$t1") s, eval $(elapsed "$t1" "$t2") s)" >&2
}

total=${#names[@]} skipped=0 failed=0 running=0
reap() {  # waits for one job; counts its failure
  local rc=0
  wait -n || rc=$?
  ((rc == 0)) || failed=$((failed + 1))
  running=$((running - 1))
}
trap 'kill $(jobs -p) 2>/dev/null; exit 130' INT TERM
echo "sweep.sh: ${total} configs, -j $jobs, --threads $threads, results in $out" >&2
for ((i = 0; i < total; i++)); do
  if [[ -s "$out/${names[$i]}.json" ]]; then skipped=$((skipped + 1)); continue; fi
  if ((dry)); then run_one "$i"; continue; fi
  while ((running >= jobs)); do reap; done
  run_one "$i" &
  running=$((running + 1))
done
while ((running > 0)); do reap; done
echo "sweep.sh: $((total - skipped)) run, $skipped skipped (result exists), $failed failed" >&2
((failed == 0))
