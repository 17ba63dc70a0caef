#!/usr/bin/env bash
# Command (1) of the README: install what is missing, build, and generate with the small model
# on the CPU backend. MODEL_DIR overrides the model (default ../shared/models/tiny-llama-a).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
MODEL_DIR=${MODEL_DIR:-../shared/models/tiny-llama-a}
BIN=${BUILD_DIR:-build}/bin/lorcserve
"$BIN" info
echo
echo "== lorcserve generate --model $MODEL_DIR --prompt 'The meaning of the word' --max-tokens 48"
"$BIN" generate --model "$MODEL_DIR" --prompt "The meaning of the word" --max-tokens 48
echo
echo "== the same, sampled (temperature 0.8, top-p 0.95, seed 1), as JSON"
"$BIN" generate --model "$MODEL_DIR" --prompt "def fibonacci(n):" --max-tokens 40 \
  --temperature 0.8 --top-p 0.95 --seed 1 --json
