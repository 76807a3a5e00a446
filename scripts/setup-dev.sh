#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine with Python 3.11:
# Debian's Chromium (browser tests, driven by Playwright; no browser download) and Fashion-MNIST
# (only needed to re-create the bundled demo data), then the Python requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m pip install -q -r requirements-dev.txt
python3 -m pip install -q --no-deps -e .  # the iarmem package itself (editable; console script `iarmem`)
