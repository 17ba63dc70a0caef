#!/usr/bin/env bash
# ctest GatewayE2E: installs the OpenAI Node SDK (npm ci from package-lock.json, into
# BUILD_DIR/gateway_node, reused while the lock file is unchanged), then runs
# gateway_e2e_test.py with Debian's Python.
#   tests/gateway/run_e2e.sh LORCSERVE MODEL_DIR BUILD_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
lorcserve=$1 model=$2 build=$3
node_dir="$build/gateway_node"
mkdir -p "$node_dir"
if ! cmp -s "$here/package-lock.json" "$node_dir/package-lock.json" \
    || [ ! -d "$node_dir/node_modules/openai" ]; then
  cp "$here/package.json" "$here/package-lock.json" "$node_dir/"
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi
cp "$here/sdk_test.mjs" "$node_dir/"  # ESM resolves `openai` from the script's folder
exec /usr/bin/python3 "$here/gateway_e2e_test.py" --lorcserve "$lorcserve" --model "$model" \
  --build-dir "$build" --node-modules "$node_dir/node_modules"
