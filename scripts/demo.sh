#!/usr/bin/env bash
# Command (1) of the README: install what is missing, build, then serve the small model on the
# CPU backend (a coordinator with two tensor-parallel worker processes, on loopback) and send it
# sample requests. MODEL_DIR overrides the model (default models/tiny-llama-a,
# the fixture in this repository);
# TP sets the number of workers (default 2); BACKEND=cuda serves on GPUs instead (one worker per
# GPU, TP of them: the GPU quick start of the README). Then the OpenAI-compatible HTTP gateway
# (scripts/gateway.sh) on GATEWAY_PORT (default 8000; 0: any free port) in front of it, and curl.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/coordinator.sh
bash scripts/install-deps.sh
bash scripts/build.sh lorcserve fixture_model
MODEL_DIR=${MODEL_DIR:-models/tiny-llama-a}
TP=${TP:-2}
BACKEND=${BACKEND:-cpu}
BIN=${BUILD_DIR:-build}/bin/lorcserve
"$BIN" info
echo

log=$(mktemp -d)
"$BIN" coordinator --model "$MODEL_DIR" --listen 127.0.0.1:0 --local-workers "$TP" \
  --backend "$BACKEND" >"$log/out" 2>"$log/err" &
coord=$!
gw=""
trap 'kill $coord $gw 2>/dev/null; wait $coord $gw 2>/dev/null; rm -rf "$log"' EXIT
addr=$(lorc_wait_listening "$log/out" "$coord") || { cat "$log/err"; exit 1; }
echo "== coordinator with $TP $BACKEND workers (tensor parallel) serving $MODEL_DIR on $addr"
"$BIN" client --server "$addr" --health
echo
echo "== lorcserve client --server $addr --prompt 'The meaning of the word' --max-tokens 48"
"$BIN" client --server "$addr" --prompt "The meaning of the word" --max-tokens 48
echo
echo "== sampled (temperature 0.8, top-p 0.95, seed 1), JSON"
"$BIN" client --server "$addr" --prompt "def fibonacci(n):" --max-tokens 40 \
  --temperature 0.8 --top-p 0.95 --seed 1 --json
echo
echo "== the same model in-process: lorcserve generate"
"$BIN" generate --model "$MODEL_DIR" --backend "$BACKEND" --prompt "A fool and his money" --max-tokens 32

echo
# The OpenAI-compatible HTTP gateway in front of the coordinator (gateway/README.md). The fixture
# model ships no chat template: the tests' Llama-3-shaped one stands in (--chat-template).
bash scripts/gateway.sh --coordinator "$addr" --port "${GATEWAY_PORT:-8000}" \
  --chat-template tests/gateway/llama3_chat_template.jinja >"$log/gw" 2>"$log/gw.err" &
gw=$!
http=$(lorc_wait_for GATEWAY_LISTENING "$log/gw" "$gw") || { cat "$log/gw.err"; exit 1; }
name=$(basename "$MODEL_DIR")  # the served model name (--served-model-name changes it)
echo "== OpenAI-compatible gateway on http://$http: POST /v1/chat/completions"
curl -sS "http://$http/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "'"$name"'", "max_tokens": 24, "temperature": 0,
  "messages": [{"role": "user", "content": "What does the word fool mean?"}]}'
echo
echo "== POST /v1/completions, streamed (server-sent events)"
curl -sS -N "http://$http/v1/completions" -H 'Content-Type: application/json' -d '{
  "model": "'"$name"'", "prompt": "A fool and his money", "max_tokens": 8, "stream": true}'
