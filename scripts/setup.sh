#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test roost. Idempotent: each check
# looks for exactly the file or command the build, the tests or the benchmarks load, and installs
# the package that provides it when it is missing.
#
#   scripts/setup.sh            Debian packages, then the Python venv with the official SDKs
#   scripts/setup.sh packages   Debian packages only (what scripts/test_setup.sh exercises)
#
# What is checked, and who needs it:
#   libclang (the library clang-sys dlopens: libclang.so, libclang-<N>.so*, libclang.so.<N>;
#     never libclang-cpp, which a fresh Debian 12 ships and bindgen cannot use) and clang's own
#     headers (stddef.h in the resource dir)      RocksDB's bindgen        -> libclang-dev
#   g++, make                                     RocksDB's C++, the Makefile
#   mosquitto, mosquitto_pub, nats-server         benchmarks/compare.sh peers
#   python3 with venv + ensurepip                 the end-to-end tests' .venv
#   unshare (util-linux)                          the disk-full test's private tmpfs
#   a nightly toolchain and cargo-fuzz            the fuzz targets' smoke runs (scripts/fuzz_smoke.sh)
#   node and npm, then tests/e2e/node/node_modules the Node SDK end-to-end tests (npm ci from the
#     committed package-lock.json)
set -euo pipefail
cd "$(dirname "$0")/.."

# The directories clang-sys searches for libclang on Linux when LIBCLANG_PATH is unset.
LIBCLANG_DIRS=(/usr/local/llvm*/lib* /usr/local/lib* /usr/local/lib*/* /usr/lib* /usr/lib*/* /usr/lib/llvm-*/lib)

# True when a libclang that bindgen can load exists: the names clang-sys matches at runtime,
# minus libclang-cpp (the C++ API library, a different thing that shares the prefix).
have_libclang() {
  local dirs=("${LIBCLANG_DIRS[@]}") d f base
  [ -n "${LIBCLANG_PATH:-}" ] && dirs=("$LIBCLANG_PATH")
  for d in "${dirs[@]}"; do
    [ -d "$d" ] || continue
    for f in "$d"/libclang.so "$d"/libclang.so.* "$d"/libclang-*.so "$d"/libclang-*.so.*; do
      [ -e "$f" ] || continue
      base=${f##*/}
      case "$base" in libclang-cpp*) continue ;; esac
      return 0
    done
  done
  return 1
}

# bindgen parses RocksDB's C header, which includes <stddef.h> from clang's resource directory.
have_clang_headers() {
  local h
  for h in /usr/lib/llvm-*/lib/clang/*/include/stddef.h /usr/lib/clang/*/include/stddef.h; do
    [ -e "$h" ] && return 0
  done
  return 1
}

missing_packages() {
  local need=()
  { have_libclang && have_clang_headers; } || need+=(libclang-dev)
  command -v g++ >/dev/null || need+=(g++)
  command -v make >/dev/null || need+=(make)
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
  command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
  command -v nats-server >/dev/null || need+=(nats-server)
  python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
  command -v unshare >/dev/null || need+=(util-linux)
  command -v node >/dev/null || need+=(nodejs)
  command -v npm >/dev/null || need+=(npm)
  echo "${need[@]}"
}

install_packages() {
  local need
  need=$(missing_packages)
  [ -z "$need" ] && return 0
  echo "setup: installing $need"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  # shellcheck disable=SC2086 # one word per package
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $need >/dev/null
  need=$(missing_packages)
  if [ -n "$need" ]; then
    echo "setup: still missing after apt-get install: $need" >&2
    return 1
  fi
}

install_venv() {
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import azure.iot.device, azure.iot.hub, azure.eventhub, azure.storage.blob, pytest, requests, nats, websocket' 2>/dev/null; then
    return 0
  fi
  echo "setup: creating .venv with the Azure IoT SDKs"
  python3 -m venv .venv
  .venv/bin/pip install -q -r tests/requirements.txt
}

# The official Node SDKs the Node end-to-end tests drive, at the versions the lock file pins.
install_node_sdks() {
  local dir=tests/e2e/node
  if [ -d "$dir/node_modules/azure-iothub" ] && [ -d "$dir/node_modules/azure-iot-device-mqtt" ] \
    && [ -d "$dir/node_modules/@azure/event-hubs" ] && [ -d "$dir/node_modules/azure-iot-device-amqp" ] && [ -d "$dir/node_modules/azure-iot-device-http" ] \
    && [ "$dir/node_modules/.package-lock.json" -nt "$dir/package-lock.json" ]; then
    return 0
  fi
  echo "setup: installing the Node SDKs (npm ci in $dir)"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
}

# cargo-fuzz and the nightly toolchain it builds with (libFuzzer needs -Zsanitizer).
install_fuzz() {
  if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "setup: installing the nightly toolchain (for cargo-fuzz)"
    rustup toolchain install nightly --profile minimal
  fi
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
  fi
}
case "${1:-all}" in
  packages) install_packages ;;
  all) install_packages; install_venv; install_node_sdks; install_fuzz ;;
  *) echo "usage: $0 [packages]" >&2; exit 2 ;;
esac
echo "setup: ok"
