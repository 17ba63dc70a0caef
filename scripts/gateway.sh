#!/usr/bin/env bash
# Starts the OpenAI-compatible HTTP gateway (gateway/README.md) in front of a running
# coordinator, with Debian's Python (/usr/bin/python3: the apt packages of
# scripts/install-deps.sh). The gRPC stubs are generated from proto/ into the build folder on
# first use.
#   scripts/gateway.sh --coordinator 127.0.0.1:50051 --port 8000 [--chat-template FILE] ...
# It prints "GATEWAY_LISTENING host:port" once the port is bound.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-build}
case "$build" in /*) ;; *) build="$repo/$build" ;; esac
stubs=${LORC_GATEWAY_STUBS:-$build/gateway_stubs}
export PYTHONPATH="$repo/gateway${PYTHONPATH:+:$PYTHONPATH}"
exec "${LORC_GATEWAY_PYTHON:-/usr/bin/python3}" -m lorcserve_gateway --stubs-dir "$stubs" \
  --proto-dir "$repo/proto" "$@"
