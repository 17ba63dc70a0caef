#!/usr/bin/env bash
# Adds NVIDIA's CUDA apt repository for Debian 12 (its signing keyring package) and refreshes the
# package lists, for both stages of the Dockerfile: the build stage installs the CUDA toolkit from
# it, the runtime stage the CUDA runtime libraries. Needs network and root.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends ca-certificates curl
curl -fsSL -o /tmp/cuda-keyring.deb \
  https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb
dpkg -i /tmp/cuda-keyring.deb
rm /tmp/cuda-keyring.deb
apt-get update -q
