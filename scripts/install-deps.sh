#!/usr/bin/env bash
# Installs the Debian 12 packages lorcserve builds against, if any is missing. Safe to re-run:
# when everything is present it changes nothing and needs no network.
#   LORC_DEPS=build  only what the build needs (the Dockerfile's build stage); default: build + test
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libgtest-dev libgmock-dev
  libopenblas-dev nlohmann-json3-dev libpcre2-dev libgloo-dev libssl-dev
  prometheus-cpp-dev
  iproute2  # tests/multihost: ip netns, veth, bridge, tc
  openssl  # the TLS tests make their certificates with the openssl CLI
  clang libclang-rt-14-dev  # scripts/fuzz.sh: libFuzzer with ASan + UBSan
)
# The tests' own tools: the deployment manifests' test (tests/deploy/) renders the kustomize
# overlays with kubectl and validates them with jsonschema and the Kubernetes Python models.
TEST_PACKAGES=(python3-kubernetes python3-jsonschema python3-yaml)
if [ "${LORC_DEPS:-all}" != build ]; then
  PACKAGES+=("${TEST_PACKAGES[@]}")
  # Debian's kubectl; a kubectl already on PATH (e.g. Google Cloud SDK's package, which owns the
  # same /usr/bin/kubectl) serves as well and would conflict with it.
  command -v kubectl >/dev/null || PACKAGES+=(kubernetes-client)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
