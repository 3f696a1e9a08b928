#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test roost:
# libclang (RocksDB's bindgen), the peer brokers, and the Python venv with the official
# Azure IoT SDKs used by the end-to-end tests. Idempotent: skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -e /usr/lib/llvm-14/lib/libclang.so ] || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v mosquitto >/dev/null || need+=(mosquitto)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
command -v nats-server >/dev/null || need+=(nats-server)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import azure.iot.device, azure.iot.hub, pytest' 2>/dev/null; then
  echo "setup: creating .venv with the Azure IoT SDKs"
  python3 -m venv .venv
  .venv/bin/pip install -q -r tests/requirements.txt
fi
echo "setup: ok"
